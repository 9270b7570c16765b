"""The model cache: per-rank smart downloads from the Hub, verified, into plain files.

The engine calls `ModelCacheManager.ensure_model`; `mlxnode cache ...` wraps the rest.
See `mlxnode.cache.layout` for the directory layout.
"""

from .layout import validate_repo_id, validate_revision
from .manager import (
    CachedCommit,
    CachedModel,
    LocalModel,
    ModelCacheManager,
    ModelPlan,
    VerifyReport,
    local_model,
)
from .plan import RankSpec

__all__ = [
    "CachedCommit",
    "CachedModel",
    "LocalModel",
    "ModelCacheManager",
    "ModelPlan",
    "RankSpec",
    "VerifyReport",
    "local_model",
    "validate_repo_id",
    "validate_revision",
]
