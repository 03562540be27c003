"""Triton kernels of fusedloss, installed as `fusedloss.triton_kernels` (never top level:
triton ships its own `triton_kernels` package).

    softmax_ce.py   softmax cross-entropy: forward (+ gradient, + decoding), backward, decode
    sigmoid_bce.py  sigmoid BCE with logits: forward (+ gradient, labels, probs, counts),
                    backward, decode
    scale_grad.py   grad *= scale in place, a no-op decided on the device when scale == 1
    _common.py      launch tables (with what each entry assumes or was measured on), math helpers

Each module has launchers with the op signatures of csrc/ops.cpp (wrapped as custom ops by
python/fusedloss/_triton.py) and `specialisations()`, every compiled variant a launcher can
select, compiled ahead of time for sm_90 by scripts/triton_aot_check.py. Importing this
package does nothing else.
"""
