"""probes.layout.hidden_state_of: the one unpacking of a module's forward output."""

from __future__ import annotations

import pytest
import torch

from probes.layout import hidden_state_of


def test_tensor_and_tuple_outputs_give_the_hidden_state() -> None:
    h = torch.zeros(2, 3, 4)
    assert hidden_state_of(h) is h
    assert hidden_state_of((h, None)) is h
    assert hidden_state_of([h, torch.ones(1)]) is h


@pytest.mark.parametrize("output", [None, (), ("text",), {"h": torch.zeros(1)}])
def test_outputs_without_a_leading_tensor_are_refused(output: object) -> None:
    with pytest.raises(TypeError, match="cannot find a hidden-state tensor"):
        hidden_state_of(output)
