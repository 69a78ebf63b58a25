"""Activation offload and the MLP in token slices: the same gradients as the plain run, and the planner's order."""

import numpy as np
import pytest
import torch

from backpropagate import Trainer
from backpropagate.train.torch import chunked_mlp
from backpropagate.train.torch import loop as torch_loop
from backpropagate.train.torch.attention import packed_attention
from backpropagate.train.torch.loading import load_for_training
from backpropagate.train.torch.losses import step_totals
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.recompute import RecomputePlan
from backpropagate.trainer import seed_everything
from train_helpers import rule_dataset

FAST = dict(
    progress=False, report_to="none", precision="fp32", learning_rate=1e-3, lora_r=8, lora_alpha=16.0, max_seq_length=96
)


@pytest.fixture(scope="module")
def dataset():
    return rule_dataset(vocab=300, samples=40, max_seq_length=96, seed=2)


def deeper(tiny_llama, tmp_path_factory, layers):
    """tiny-llama with `layers` decoder layers (random weights), saved to a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"{layers}-layers")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def four_layers(tiny_llama, tmp_path_factory):
    """Four decoder layers: room for inputs both on the card and on the host."""
    return deeper(tiny_llama, tmp_path_factory, 4)


def gradients(path, dataset, chunk=None, on_card=None, every=1, room=None, **overrides):
    """Loss and adapter gradients of one micro-batch of 3 packed rows (288 tokens) through the training loop's step.

    `on_card`: offload all recomputed layers' inputs but the last `on_card` ones' (one in `every`, or as many as
    the host has `room` for; the rest replayed).
    """
    config = Trainer("tiny-llama", **FAST, **overrides).config
    seed_everything(config.seed)
    tm = load_for_training(path, config)
    if on_card is not None:
        tm.recompute.start_offload(on_card, every, room)
    if chunk is not None:
        for layer in tm.recompute.layers:
            chunked_mlp.install(layer.mlp, chunk)
    objective = objective_for(config, dataset, torch_loop.policy_of(tm))
    batch = torch_loop.micro_batches(dataset, np.arange(3), 3)[0]
    totals = torch.tensor([float(c) for c in step_totals(objective, [batch])])
    with packed_attention(tm.model):
        loss = torch_loop.forward_backward(tm, objective, objective.device_batch(batch, tm.device), totals)
    grads = {n: p.grad.clone() for n, p in tm.model.named_parameters() if p.requires_grad}
    return float(loss), grads, tm


def test_offloaded_inputs_give_identical_gradients(tiny_llama, dataset):
    loss, plain, _ = gradients(tiny_llama, dataset, gradient_checkpointing="on", offload_activations="off")
    loss_off, moved, tm = gradients(tiny_llama, dataset, gradient_checkpointing="on", offload_activations="on")
    assert tm.recompute.describe() == "recompute[2/2]+offload[1/2]"
    # The first layer's input went to the host buffer and came back (the last layer's stays in place).
    assert tm.recompute.offload.offloaded == 1
    assert tm.recompute.offload.host_bytes == 288 * tm.base.config.hidden_size * 4
    assert loss_off == loss and plain.keys() == moved.keys() and len(plain) == 28
    for name in plain:
        assert torch.equal(plain[name], moved[name]), name


def test_inputs_split_between_card_and_host_give_identical_gradients(four_layers, dataset):
    loss, plain, _ = gradients(four_layers, dataset, gradient_checkpointing="on", offload_activations="off")
    loss_off, moved, tm = gradients(four_layers, dataset, on_card=2, gradient_checkpointing="on")
    assert tm.recompute.describe() == "recompute[4/4]+offload[2/4]"
    # The first two layers' inputs went to the host and came back; the last two stayed in place.
    assert tm.recompute.offload.offloaded == 2
    assert tm.recompute.offload.host_bytes == 2 * 288 * tm.base.config.hidden_size * 4
    assert loss_off == loss and plain.keys() == moved.keys() and len(plain) == 56
    for name in plain:
        assert torch.equal(plain[name], moved[name]), name


@pytest.mark.parametrize(("every", "room", "stored", "replayed"), [(2, None, 2, 1), (3, None, 1, 2), (3, 2, 2, 1)])
def test_replayed_inputs_give_identical_gradients(four_layers, dataset, every, room, stored, replayed):
    """Of the three offloaded inputs, one in `every` (or the host's `room`) is stored; backward replays the rest, bit for bit."""
    loss, plain, _ = gradients(four_layers, dataset, gradient_checkpointing="on", offload_activations="off")
    loss_off, moved, tm = gradients(
        four_layers, dataset, on_card=1, every=every, room=room, gradient_checkpointing="on"
    )
    assert tm.recompute.describe() == f"recompute[4/4]+offload[{stored}/4]+replay[{replayed}/4]"
    offload = tm.recompute.offload
    assert (offload.offloaded, offload.replayed) == (stored, replayed)
    assert offload.host_bytes == stored * 288 * tm.base.config.hidden_size * 4
    assert loss_off == loss and plain.keys() == moved.keys() and len(plain) == 56
    for name in plain:
        assert torch.equal(plain[name], moved[name]), name


def test_a_host_one_input_short_replays_one_layer(tiny_llama, tmp_path_factory, dataset):
    """The host holds five inputs and the card two: six leave the card, one is replayed, not one in two."""
    from transformers import AutoModelForCausalLM

    eight_layers = deeper(tiny_llama, tmp_path_factory, 8)
    plan = RecomputePlan(AutoModelForCausalLM.from_pretrained(eight_layers), "on", "auto")
    # Segments of two; the card keeps two inputs, as a segment would hold, and the host has room for five.
    assert plan.placement(0, 1, 5.5 / 0.8) == (2, 2, 5)
    loss, plain, _ = gradients(eight_layers, dataset, gradient_checkpointing="on", offload_activations="off")
    loss_off, moved, tm = gradients(eight_layers, dataset, on_card=2, every=2, room=5, gradient_checkpointing="on")
    assert tm.recompute.describe() == "recompute[8/8]+offload[5/8]+replay[1/8]"
    assert (tm.recompute.offload.offloaded, tm.recompute.offload.replayed) == (5, 1)
    assert loss_off == loss and plain.keys() == moved.keys()
    for name in plain:
        assert torch.equal(plain[name], moved[name]), name


def test_an_input_that_is_not_the_layer_below_s_output_is_stored():
    """Replay only rebuilds a layer's input from the layer below where that input is the output itself."""
    from torch.utils.checkpoint import checkpoint

    from backpropagate.train.torch.offload import ActivationOffload, offloaded

    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    offload = ActivationOffload(torch.device("cpu"), every=3)
    run = offloaded(lambda f, *a: checkpoint(f, *a, use_reentrant=False), offload)
    x = torch.randn(4, 8, requires_grad=True)
    h = run(layers[0], x)
    h = run(layers[1], h * 2)  # something between the layers: its input is not layer 0's output
    out = run(layers[2], h)
    assert (offload.offloaded, offload.replayed) == (2, 1)
    out.sum().backward()
    expected = torch.autograd.grad(layers[2](layers[1](layers[0](x) * 2)).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_planner_keeps_on_the_card_the_inputs_it_has_room_for(four_layers):
    """Offload auto: inputs the budget holds beyond the fewest stay on the card; out of memory sends half to the host."""
    from transformers import AutoModelForCausalLM

    from backpropagate.memory_estimate import input_bytes, recomputed_step_bytes

    model = AutoModelForCausalLM.from_pretrained(four_layers)
    config, tokens, dtype = model.config, 4096, torch.bfloat16
    fewest = recomputed_step_bytes(config, tokens, dtype, offload=True)
    one_input = input_bytes(config, tokens, dtype)
    assert one_input == tokens * config.hidden_size * 2
    room = RecomputePlan(model, "on", "auto")
    room.offload_if_short(recomputed_step_bytes(config, tokens, dtype, offload=False), config, dtype, tokens)
    assert room.offload is None  # the whole step fits
    plan = RecomputePlan(model, "on", "auto")
    # The fewest inputs on the card are two (the last layer's and the one prefetched); all four would not fit.
    plan.offload_if_short(fewest + 1.5 * one_input, config, dtype, tokens)
    assert plan.describe() == "recompute[4/4]+offload[2/4]" and plan.on_card == 2
    assert plan.back_off() and plan.describe() == "recompute[4/4]+offload[3/4]"
    assert not plan.back_off()  # the loop halves the micro-batch next
    short = RecomputePlan(model, "on", "auto")
    short.offload_if_short(fewest / 2, config, dtype, tokens)
    assert short.describe() == "recompute[4/4]+offload[3/4]"


@pytest.mark.parametrize(
    ("host_inputs", "described"),
    [
        (2, "recompute[4/4]+offload[2/4]"),  # the host holds what the card cannot
        (1.5, "recompute[4/4]+offload[1/4]+replay[1/4]"),  # one stored input, one replayed from it
        (0.5, "recompute[4/4]+offload[1/4]"),  # nothing fits: the least host memory, and a warning
    ],
)
def test_planner_replays_inputs_the_host_cannot_hold(four_layers, host_inputs, described, caplog, monkeypatch):
    """With room for one more input on the card: keep it there, and a segment of two replays below it if need be.

    Where no segment fits the host, the card keeps what the longest would hold, so nothing is replayed.
    """
    from transformers import AutoModelForCausalLM

    from backpropagate.memory_estimate import input_bytes, recomputed_step_bytes
    from backpropagate.train.torch import recompute

    model = AutoModelForCausalLM.from_pretrained(four_layers)
    config, tokens, dtype = model.config, 4096, torch.bfloat16
    fewest, one = recomputed_step_bytes(config, tokens, dtype, offload=True), input_bytes(config, tokens, dtype)
    ram = host_inputs * one / recompute.HOST_TARGET
    monkeypatch.setattr(recompute, "available_ram", lambda: ram)
    plan = RecomputePlan(model, "on", "auto")
    plan.offload_if_short(fewest + 1.5 * one, config, dtype, tokens, ram=ram)
    assert plan.describe() == described
    assert ("host memory" in caplog.text) == (host_inputs < 1)
    assert plan.back_off() is False  # the host allows no fewer inputs on the card: the micro-batch is halved next
    assert plan.describe() == described


def test_mlp_in_token_slices_matches_one_piece(tiny_llama, dataset):
    """288 tokens in slices of 50 (the last one short): outputs and gradients agree to fp32 rounding."""
    loss, whole, _ = gradients(tiny_llama, dataset, gradient_checkpointing="on")
    loss_sliced, sliced, _ = gradients(tiny_llama, dataset, chunk=50, gradient_checkpointing="on")
    assert loss_sliced == pytest.approx(loss, rel=1e-6)
    for name in whole:
        # Weight gradients are summed slice by slice, so only the summation order differs.
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in sliced.items() if "mlp" in n)


def test_sliced_and_offloaded_training_draws_the_same_curve(tiny_llama, dataset, tmp_path, monkeypatch):
    """Two optimizer steps through the Trainer: loss curve of offload + 50-token MLP slices == the plain one."""
    options = dict(FAST, micro_batch=3, grad_accumulation=1, gradient_checkpointing="on")
    plain = Trainer("tiny-llama", output_dir=str(tmp_path / "a"), offload_activations="off", **options)
    plain_losses = [loss for _, loss in plain.train(dataset, steps=3).losses]
    monkeypatch.setattr(chunked_mlp, "CHUNK_TOKENS", 50)
    moved = Trainer("tiny-llama", output_dir=str(tmp_path / "b"), offload_activations="on", **options)
    result = moved.train(dataset, steps=3)
    assert "recompute[2/2]+offload[1/2]" in result.features
    np.testing.assert_allclose([loss for _, loss in result.losses], plain_losses, rtol=1e-5)


def test_planner_recomputes_then_offloads_then_gives_up(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = RecomputePlan(model, "off", "auto")
    assert plan.describe() == "recompute[0/2]" and plan.graph_obstacle(96) is None
    assert plan.back_off() and plan.describe() == "recompute[1/2]"
    assert plan.back_off() and plan.describe() == "recompute[2/2]"
    assert plan.back_off() and plan.describe() == "recompute[2/2]+offload[1/2]" and plan.offload is not None
    assert not plan.back_off()  # the loop halves the micro-batch next
    assert plan.graph_obstacle(96) == "activation offload"
    never = RecomputePlan(model, "on", "off")
    assert not never.back_off() and never.offload is None
    assert (
        never.graph_obstacle(chunked_mlp.CHUNK_TOKENS + 1) == f"MLP in slices at {chunked_mlp.CHUNK_TOKENS + 1} tokens"
    )


def test_offload_setting_is_checked():
    from backpropagate.errors import ConfigError

    with pytest.raises(ConfigError, match="offload_activations='sometimes' is invalid"):
        Trainer("tiny-llama", offload_activations="sometimes")


def test_long_packed_attention_never_forms_the_score_matrix():
    """16k tokens in two samples on the CPU: the flash kernel runs, no allocation near [T, T] scores (1 GiB)."""
    from torch.profiler import ProfilerActivity, profile

    from backpropagate.train.torch.attention import packed_attention_forward, packed_kwargs

    tokens, heads, dim = 16384, 2, 16
    q, k, v = (torch.randn(1, h, tokens, dim) for h in (heads, 1, 1))
    cu = torch.tensor([0, 6000, tokens], dtype=torch.int32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, _ = packed_attention_forward(torch.nn.Module(), q, k, v, None, **packed_kwargs(cu, 10384))
    events = prof.key_averages()
    assert out.shape == (1, tokens, heads, dim)
    assert any("flash_attention" in e.key for e in events)
    assert max(e.cpu_memory_usage for e in events if e.key.startswith("aten::")) < tokens * tokens


def test_out_of_memory_with_every_layer_recomputed_turns_offload_on(tiny_llama, dataset, tmp_path, monkeypatch):
    """The loop's recovery: recompute, then offload, and only then halve the micro-batch."""
    real = torch_loop.accumulate_gradients
    failures = []

    def fails_once_without_offload(tm, *args, **kwargs):
        if tm.recompute.offload is None:
            failures.append(tm.recompute.describe())
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(tm, *args, **kwargs)

    monkeypatch.setattr(torch_loop, "accumulate_gradients", fails_once_without_offload)
    options = dict(FAST, micro_batch=2, grad_accumulation=1, gradient_checkpointing="off")
    result = Trainer("tiny-llama", output_dir=str(tmp_path / "run"), **options).train(dataset, steps=2)
    # Kept layers went back to recomputing first (2 -> 1 -> 0 kept), then the inputs moved to the host.
    assert failures == ["recompute[0/2]", "recompute[1/2]", "recompute[2/2]"]
    assert "recompute[2/2]+offload[1/2]" in result.features and len(result.losses) == 2


def test_only_recomputed_layers_slice_their_mlp(tiny_llama):
    """A kept layer's MLP runs whole (slicing it would only add a forward), so graphs can capture it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    plan = RecomputePlan(model, "on")
    calls: dict[int, list[int]] = {0: [], 1: []}
    for i, layer in enumerate(plan.layers):
        chunked_mlp.install(layer.mlp, 50)
        whole = layer.mlp.bp_unchunked_forward
        layer.mlp.__dict__["bp_unchunked_forward"] = lambda x, i=i, whole=whole: (
            calls[i].append(x.shape[-2]) or whole(x)
        )
    plan.set_kept(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 120))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == {0: [50, 50, 20] * 2, 1: [120]}  # forward, then backward's slices; the kept layer once
    assert plan.graph_obstacle(120) == "MLP in slices at 120 tokens"
    plan.set_kept(2)
    assert plan.graph_obstacle(120) is None


def test_mlp_slices_in_evaluation_too(tiny_llama):
    """Under no_grad (evaluation) a long input also runs slice by slice, with the same output."""
    from transformers import AutoModelForCausalLM

    mlp = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].mlp
    chunked_mlp.install(mlp, 50)
    whole = mlp.bp_unchunked_forward
    calls = []
    mlp.__dict__["bp_unchunked_forward"] = lambda x: calls.append(x.shape[-2]) or whole(x)
    x = torch.randn(1, 288, mlp.gate_proj.in_features)
    with torch.no_grad():
        sliced = mlp(x)
        expected = whole(x)
    assert calls == [50] * 5 + [38]
    torch.testing.assert_close(sliced, expected, rtol=1e-6, atol=1e-7)


def test_no_replay_under_fsdp(four_layers, tmp_path):
    """A sharded layer's weights are whole only in its own forward and backward, so the host keeps every input."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_layers)
    plan = RecomputePlan(model, "on", "auto")
    assert plan.placement(0, 1, 1 / 0.8) == (2, 2, 1)  # room for one input on the host: replay the rest
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for layer in plan.layers:
            fully_shard(layer)
        assert plan.placement(0, 1, 1 / 0.8) == (1, 1, 1)
    finally:
        dist.destroy_process_group()


def test_an_offload_started_by_out_of_memory_replays_what_the_host_cannot_hold(four_layers, monkeypatch):
    """The first step's input size is noted, so the recovery's offload also fits the RAM available."""
    from transformers import AutoModelForCausalLM

    from backpropagate.memory_estimate import input_bytes
    from backpropagate.train.torch import recompute

    model = AutoModelForCausalLM.from_pretrained(four_layers)
    config, tokens, dtype = model.config, 4096, torch.bfloat16
    plan = RecomputePlan(model, "on", "auto")
    plan.prepare(config, dtype, tokens)  # on the CPU nothing is offloaded up front
    assert plan.offload is None and plan.input_size == input_bytes(config, tokens, dtype)
    monkeypatch.setattr(recompute, "available_ram", lambda: 1.5 * plan.input_size / recompute.HOST_TARGET)
    assert plan.back_off() and plan.describe() == "recompute[4/4]+offload[1/4]+replay[1/4]"
