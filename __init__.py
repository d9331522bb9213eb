"""sepnet: 3D-SepNet ensembles for head-and-neck organs-at-risk segmentation in CT.

Rooms: ``sepnet.core`` (pure math), ``sepnet.data`` (readers, phantom, Zarr store,
patch sampler), ``sepnet.evaluation`` (metrics, uncertainty, reports), ``sepnet.hpc``
(executors, DDP, checkpoints) and ``sepnet.jobs`` (entry points, config, MLflow).
"""

__version__ = "0.1.0"
