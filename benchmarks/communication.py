"""4. Communication: bytes per site per round, head only against the full model.

Sizes are of the Flower wire format: the ``ArrayRecord`` each way, serialised
to protobuf by Flower's own ``serde`` (what travels inside the Message).
"Full model" is what a system that fine-tunes end to end (or the naive loop
that ships the whole model, as the Flower Opacus example does) sends: the
backbone's state_dict plus the head.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from common.models.backbones import get_backbone
from common.models.finetune import make_model, model_state
from common.models.heads import head_state, make_head
from common.models.names import TRAINABLE_MODES
from common.protocol import to_array_record

log = logging.getLogger(__name__)


def record_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Serialised size of ``arrays`` as one Flower ArrayRecord (protobuf)."""
    from flwr.common.serde import array_record_to_proto

    return array_record_to_proto(to_array_record(arrays)).ByteSize()


def backbone_state(name: str, image_size: int) -> tuple[OrderedDict[str, np.ndarray], int]:
    """(state arrays, feature dim) of a registry backbone."""
    import torch

    bb = get_backbone(name, image_size)
    if bb.is_identity:
        return OrderedDict(), 0
    module = bb.module()
    state = OrderedDict((f"backbone.{k}", v.detach().cpu().numpy())
                        for k, v in module.state_dict().items())
    with torch.no_grad():
        dim = bb.extract(np.zeros((1, image_size, image_size), np.float32)).shape[1]
    return state, dim


def run(*, backbones: tuple[str, ...] = ("efficientnet-lite0", "identity"),
        heads: tuple[str, ...] = ("linear", "mlp"), image_size: int = 64,
        identity_dim: int = 28 * 28, num_classes: int = 2, hidden_dim: int = 128) -> dict:
    """Returns the ``communication`` results block.

    ``head_bytes`` and ``full_bytes`` are per site per round *each way*
    (server to site, and the same again back); ``per_round_both_ways`` doubles them.
    """
    rows = []
    for name in backbones:
        state, dim = backbone_state(name, image_size)
        dim = dim or identity_dim
        for head_name in heads:
            head = head_state(make_head(head_name, in_dim=dim, num_classes=num_classes,
                                        hidden_dim=hidden_dim))
            hb = record_bytes(head)
            fb = record_bytes(OrderedDict([*state.items(), *head.items()]))
            rows.append({"backbone": name, "head": head_name, "feature_dim": dim,
                         "head_parameters": int(sum(v.size for v in head.values())),
                         "backbone_state_values": int(sum(v.size for v in state.values())),
                         "head_bytes": hb, "full_bytes": fb, "ratio_full_to_head": fb / hb,
                         "per_round_both_ways": {"head": 2 * hb, "full": 2 * fb}})
            log.info("communication %s + %s head: head %d B, full %d B (x%.0f)", name,
                     head_name, hb, fb, fb / hb)
    default = next(r for r in rows if r["backbone"] == backbones[0] and r["head"] == heads[0])
    return {"description": "bytes per site per round, each way (Flower ArrayRecord protobuf)",
            "head_bytes": default["head_bytes"], "full_bytes": default["full_bytes"],
            "default": {"backbone": default["backbone"], "head": default["head"]},
            "rows": rows,
            "trainable_modes": trainable_rows(image_size=image_size, num_classes=num_classes,
                                              full_bytes=default["full_bytes"]),
            "not_measured": ["file:<checkpoint> backbones (a hospital's own model: its size is "
                             "its own)", "minilm (named in the architecture, not in the registry)"]}


def trainable_rows(*, image_size: int, num_classes: int, full_bytes: int,
                   backbone: str = "efficientnet-lite0", head: str = "linear") -> list[dict]:
    """What each ``trainable`` mode sends (common/models/finetune.py: the head, plus the
    tuned suffix tensors as ``backbone.<name>``), against the full model."""
    out = []
    for mode in TRAINABLE_MODES:
        model = make_model(mode, head=head, backbone=backbone, image_size=image_size,
                           in_dim=1280, num_classes=num_classes)
        state = model_state(model)
        b = record_bytes(state)
        out.append({"mode": mode, "backbone": backbone, "head": head,
                    "trained_parameters": int(sum(v.size for v in state.values())),
                    "bytes": b, "per_round_both_ways": 2 * b,
                    "ratio_full_to_mode": full_bytes / b})
        log.info("communication trainable=%s: %d parameters, %d B each way (full model x%.1f)",
                 mode, out[-1]["trained_parameters"], b, full_bytes / b)
    return out
