"""Observability: what every shoal process reports about itself (metrics, traces, logs).

Sits just above the wire (``_transport``) and the specs (``_seam``), below routers,
replicas, the proxy and the controller, which all report through it.
"""
