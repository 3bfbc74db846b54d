"""Region names each cloud accepts, used to catch a region of the wrong cloud at spec load.

The lists are the public regions at the time of writing. A region missing here is rejected with a
message that says so; add it to the list (and a test) when a cloud opens a new one.
"""

from __future__ import annotations

AZURE_REGIONS: frozenset[str] = frozenset(
    """
    australiacentral australiacentral2 australiaeast australiasoutheast austriaeast belgiumcentral
    brazilsouth brazilsoutheast canadacentral canadaeast centralindia centralus centraluseuap
    chilecentral denmarkeast eastasia eastus eastus2 eastus2euap francecentral francesouth
    germanynorth germanywestcentral indonesiacentral israelcentral italynorth japaneast japanwest
    jioindiacentral jioindiawest koreacentral koreasouth malaysiawest mexicocentral
    newzealandnorth northcentralus northeurope norwayeast norwaywest polandcentral qatarcentral
    southafricanorth southafricawest southcentralus southeastasia southindia spaincentral
    swedencentral swedensouth switzerlandnorth switzerlandwest uaecentral uaenorth uksouth ukwest
    westcentralus westeurope westindia westus westus2 westus3
    """.split()
)

AWS_REGIONS: frozenset[str] = frozenset(
    """
    af-south-1 ap-east-1 ap-east-2 ap-northeast-1 ap-northeast-2 ap-northeast-3 ap-south-1
    ap-south-2 ap-southeast-1 ap-southeast-2 ap-southeast-3 ap-southeast-4 ap-southeast-5
    ap-southeast-6 ap-southeast-7 ca-central-1 ca-west-1 eu-central-1 eu-central-2 eu-north-1
    eu-south-1 eu-south-2 eu-west-1 eu-west-2 eu-west-3 il-central-1 me-central-1 me-south-1
    mx-central-1 sa-east-1 us-east-1 us-east-2 us-gov-east-1 us-gov-west-1 us-west-1 us-west-2
    """.split()
)

REGIONS: dict[str, frozenset[str]] = {"azure": AZURE_REGIONS, "aws": AWS_REGIONS}


def cloud_of_region(region: str) -> str | None:
    """The cloud a region name belongs to, or None when no cloud knows it."""
    for cloud, names in REGIONS.items():
        if region in names:
            return cloud
    return None
