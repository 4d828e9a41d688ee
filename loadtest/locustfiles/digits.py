"""Load for the digits model: `locust -f loadtest/locustfiles/digits.py Rest` (or `Grpc`); see loadtest/run.py."""

from loadtest.locustfiles.base import GrpcUser, RestUser


class Rest(RestUser):
    model = "digits"


class Grpc(GrpcUser):
    model = "digits"
