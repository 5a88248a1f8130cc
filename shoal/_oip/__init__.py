"""The Open Inference Protocol (KServe / Triton "v2"): REST and gRPC. Public names are in
:mod:`shoal.oip`; the guide is docs/oip.md.

- ``model.py``: ``@oip.model`` and the metadata it records;
- ``tensors.py``: datatypes, numpy arrays from JSON or binary data and back;
- ``codec.py``: REST requests and responses (JSON, Triton's binary tensor extension);
- ``rest.py``: the model replica's ``__call__`` (metadata, ready, infer);
- ``server.py``: the server-level paths the HTTP proxy answers (``/v2``, health);
- ``grpc_service.py``: ``inference.GRPCInferenceService`` (``protos/``: the .proto and the
  code generated from it by ``scripts/protos.py``).
"""
