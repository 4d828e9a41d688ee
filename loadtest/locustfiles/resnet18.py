"""Load for the resnet18 model: `locust -f loadtest/locustfiles/resnet18.py Rest` (or `Grpc`); see loadtest/run.py."""

from loadtest.locustfiles.base import GrpcUser, RestUser


class Rest(RestUser):
    model = "resnet18"


class Grpc(GrpcUser):
    model = "resnet18"
