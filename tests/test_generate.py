"""Greedy generation: batching by length and the shared-prefix cache give what one prompt at a time gives."""

from __future__ import annotations

import torch

from lorahub.data import shared_prefix_length
from lorahub.generate import generate

PREFIX = "Answer with one word.\n\nQ: red or blue?\nA: red\n\nQ: cat or dog?\nA: dog\n\nQ: "
QUESTIONS = ["up or down?", "a much longer question about left, right, or the middle of it?", "yes?", "one or two?",
             "sun, moon or stars tonight?"]


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5]]) == 4
    assert shared_prefix_length([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == 4  # each row keeps a token of its own
    assert shared_prefix_length([[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]) == 0  # shorter than min_length
    assert shared_prefix_length([[1, 2, 3, 4, 5]]) == 0


def test_shared_prefix_and_length_batches_equal_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights than the init's, so that answers depend on the prompt
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.4)
    prompts = [PREFIX + q + "\nA:" for q in QUESTIONS]
    embedded: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: embedded.append(a[0].numel()))
    try:
        shared = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
        n_shared = sum(embedded)
        embedded.clear()
        plain = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, share_prefix=False)
        n_plain = sum(embedded)
    finally:
        hook.remove()
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert shared == plain == single
    assert any(single) and len(set(single)) > 1  # real, differing answers, in input order
    assert n_shared < n_plain - 3 * 10  # the ~40-token prefix ran once, not once per batch
