"""Makes ``twistd matrix-edge`` available once matrix-edge is installed."""

from twisted.application.service import ServiceMaker

MatrixEdge = ServiceMaker(
    "matrix-edge",
    "matrix_edge.tap",
    "A Matrix-aware reverse proxy for Synapse.",
    "matrix-edge",
)
