"""Load for the digits_tensor model: `locust -f loadtest/locustfiles/digits_tensor.py Rest` (or `Grpc`)."""

from loadtest.locustfiles.base import GrpcUser, RestUser


class Rest(RestUser):
    model = "digits_tensor"


class Grpc(GrpcUser):
    model = "digits_tensor"
