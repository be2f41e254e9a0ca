"""MiHF-Tr (Wei et al., ACM MM 2025): model, loss and helpers.

One small module per component of the paper (section 3), each equation cited where it is computed:
`stems.py` (eq. 1), `gcn.py` (eq. 2), `lamif.py` (eqs. 3-6), `gcmif.py` (eq. 7), `loss.py` (eq. 8),
`mihf_tr.py` (the model, its config, batches, parameter counts). `python -m model [params.yaml]`
prints the parameter count per component.

Parameters at the paper settings (l = 11, B = 4, d = 256, 2 GCN layers, 3 classes):

    component              parameters   what
    stem_appearance           225,344   ResNet50 conv1 + bn1 (9,536) + layer1 (215,808)
    stem_motion               225,344   the same, on the flow (u, v, |flow|)
    gcn                       157,257   6 -> 256 per landmark (51 x 1,792 = 91,392), 256 -> 256
                                        (65,792), 73 edge weights
    align_appearance        1,048,832   linear B*B*256 = 4,096 -> 256, with bias
    align_motion            1,048,832   the same for MF
    local_fusion              196,610   SC-SA W_Q, W_K, W_V (3 x 256 x 256, no bias) + w_a, w_g
    embed_norm                  1,536   a LayerNorm (2 x 256) per modality where its tokens are embedded
    global_fusion             540,160   1 pre-norm transformer layer (8 heads, ff 512): 527,104,
                                        + token embedding 51 x 256 = 13,056
    classifier                    771   linear 256 -> 3
    total                   3,444,686   paper: 3,419,074 (+25,612, +0.75%)

The paper does not give the transformer size or the GCN/classifier details; everything except the
transformer and the GCN is fixed by the paper's numbers (l, B, d, 51 nodes, 3 x d x d SC-SA). The
transformer was sized to land near the paper's total: 1 layer with a feed-forward of 2d = 512 (with
the shared-weight GCN of Kipf & Welling the total was -1.9%; 2 layers would give +17%). The GCN's
first layer has weights per landmark (`model.gcn_weights: node`, chosen on development data,
docs/experiments.md), +89,600 over a shared one. With frozen stems (the CPU default) 2,993,998 are trained.
"""

from model.loss import build_loss, class_weights
from model.mihf_tr import MiHFTr, ModelConfig, count_parameters, jitter_landmarks, prepare_batch

__all__ = [
    "MiHFTr",
    "ModelConfig",
    "build_loss",
    "class_weights",
    "count_parameters",
    "jitter_landmarks",
    "prepare_batch",
]
