"""The KServe peer of the benchmark (``kserve-oip`` rows): a ``kserve.ModelServer`` 0.21 serving the same
exported ONNX files with ONNX Runtime in-process, called over OIP gRPC with the very payloads sent to our
gateway's OIP service.

- :mod:`~cnnserve.bench.kserve_peer.venv`: its own venv (KServe needs protobuf < 7), built once;
- :mod:`~cnnserve.bench.kserve_peer.server`: the script that venv runs (a ``kserve.Model`` over ONNX Runtime);
- :mod:`~cnnserve.bench.kserve_peer.peer`: its process, started on free ports and waited on until ready.
"""

from cnnserve.bench.kserve_peer.peer import KServePeer
from cnnserve.bench.kserve_peer.venv import PeerUnavailableError, ensure_venv

__all__ = ["KServePeer", "PeerUnavailableError", "ensure_venv", "KIND"]

KIND = "kserve-oip"  # its rows' name and the load generator's kind
