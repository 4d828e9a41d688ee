"""Load for the minilm model: `locust -f loadtest/locustfiles/minilm.py Rest` (or `Grpc`); see loadtest/run.py."""

from loadtest.locustfiles.base import GrpcUser, RestUser


class Rest(RestUser):
    model = "minilm"


class Grpc(GrpcUser):
    model = "minilm"
