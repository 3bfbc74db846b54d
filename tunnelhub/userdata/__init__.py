"""The proxy VMs' bootstrap cloud-init (``render_cloud_init(hub, slot) -> UserData``, see ``render``)
and the hub configuration document they apply live (``render_document(hub) -> HubDocument``, see
``document``)."""

from tunnelhub.userdata.render import (
    AWS_SLOT_ADDRESSES_TAG,
    AWS_SLOT_COUNT_TAG,
    AWS_SLOT_TAG,
    AZURE_HOST_KEY_TAG,
    USER_DATA_LIMIT_BYTES,
    S3Object,
    UserData,
    UserDataError,
    VmFile,
    extract_files,
    files_bucket_name,
    host_key_parameter_name,
    render_cloud_init,
)
from tunnelhub.userdata.document import (  # noqa: I001 - document imports render
    AWS_DOCUMENT_KEY,
    AZURE_CONFIG_VERSION_TAG,
    HubDocument,
    render_document,
)

__all__ = [
    "AWS_DOCUMENT_KEY",
    "AWS_SLOT_ADDRESSES_TAG",
    "AWS_SLOT_COUNT_TAG",
    "AWS_SLOT_TAG",
    "AZURE_CONFIG_VERSION_TAG",
    "AZURE_HOST_KEY_TAG",
    "USER_DATA_LIMIT_BYTES",
    "HubDocument",
    "S3Object",
    "UserData",
    "UserDataError",
    "VmFile",
    "extract_files",
    "files_bucket_name",
    "host_key_parameter_name",
    "render_cloud_init",
    "render_document",
]
