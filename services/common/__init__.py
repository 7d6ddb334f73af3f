"""Pieces both services share: errors, logging, configuration, auth and the gRPC server frame."""
