"""twistd plugin: ``twistd -n metahub --config metahub.yaml``."""
from twisted.application.service import ServiceMaker

metahub = ServiceMaker(
    "metahub",
    "metahub.app.tap",
    "Pull-through caching registry proxy serving each machine type its own image",
    "metahub",
)
