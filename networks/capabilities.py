"""What a network class can do, declared on the class and read by training and inference.

Training, the objective, sequence dropout, test.py and predict.py ask :func:`capabilities_of`
rather than probing a model (``hasattr(model, "forward_train")``, ``forward``'s signature, its
variant name), so a new architecture states once what it offers and every consumer agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Capabilities:
    """Declared as the class attribute ``capabilities`` of a network.

    * ``sequence_mask``: ``forward(x, sequence_mask=[B, S] bool)`` drops the branches of absent
      sequences (the I_MMSeg variants); without it an absent sequence is only a zeroed channel.
    * ``training_outputs``: ``forward_train(x, sequence_mask)`` returns the auxiliary logits and
      pixel embeddings the deep-supervision and contrastive terms need
      (:class:`networks.immseg.IMMSegOutput`); the plain ``forward`` returns logits only.
    * ``single_sequence``: the network reads one sequence (``model.sequence``) and ignores the
      others, so it cannot predict without that one.
    """

    sequence_mask: bool = False
    training_outputs: bool = False
    single_sequence: bool = False


#: A module that declares nothing: logits from all sequences stacked as channels.
PLAIN = Capabilities()


def capabilities_of(model: nn.Module) -> Capabilities:
    """``model``'s declared capabilities (:data:`PLAIN` for a module that declares none)."""
    declared = getattr(model, "capabilities", PLAIN)
    if not isinstance(declared, Capabilities):
        raise TypeError(f"{type(model).__name__}.capabilities must be a Capabilities, got "
                        f"{type(declared).__name__}")
    return declared
