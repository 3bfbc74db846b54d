"""The proxy VMs' cloud-init: ``render_cloud_init(hub, slot) -> UserData`` (see ``render``)."""

from tunnelhub.userdata.render import (
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

__all__ = [
    "AWS_SLOT_TAG",
    "AZURE_HOST_KEY_TAG",
    "USER_DATA_LIMIT_BYTES",
    "S3Object",
    "UserData",
    "UserDataError",
    "VmFile",
    "extract_files",
    "files_bucket_name",
    "host_key_parameter_name",
    "render_cloud_init",
]
