"""The homomorphic core on SEAL's own API (tenseal.sealapi): parameters, key bundles,
the latency and batch layouts. Transport-free; raises encinfer.common.errors."""
