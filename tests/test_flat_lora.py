"""FlatLoRATrainer against Flat-LoRA steps written out by hand on the perturbed weights (float64), and the weights
after a step against the unperturbed ones plus the optimizer's update, bit for bit."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from models import COMMON, gpt2, launch, lm_data, params
from peft import LoraConfig, get_peft_model
from transformers import Seq2SeqTrainingArguments, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D

from fam_hf import FlatLoRAConfig, FlatLoRATrainer
from fam_hf.perturbation import PerturbedLayers, cosine_sigma, noise_seed, perturbed_layers, row_scaled_noise

HERE = Path(__file__).parent
LR, SIGMA = 0.5, 0.1
LORA = dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True,
            init_lora_weights=False)  # fmt: skip


def full_64(seed=0):
    return gpt2(seed).double()


def lora_64(seed=0):
    model = gpt2(seed).double()
    torch.manual_seed(seed + 100)
    return get_peft_model(model, LoraConfig(**LORA))


class Recorder(FlatLoRATrainer):
    """Keeps every micro-batch as Trainer hands it over (with its loss denominator) and the gradients the optimizer
    steps with (after clipping)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = {k: v.detach().clone() for k, v in inputs.items()}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:  # what the model's loss is handed
            batch["num_items_in_batch"] = num_items_in_batch
        self.seen.append(batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)

        def keep(opt, *_):
            self.grads.append({id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                               if p.grad is not None})  # fmt: skip

        optimizer.register_step_pre_hook(keep)
        return optimizer


def flat_trainer(model, data, tmp_path, cls=Recorder, **kw):
    args = FlatLoRAConfig(output_dir=str(tmp_path), **{**COMMON, "flat_lora_sigma": SIGMA, **kw})
    trainer = cls(model=model, args=args, train_dataset=data)
    trainer.seen, trainer.grads = [], []
    return trainer


def hand_perturbed_step(model, batch, seed, step, sigma):
    """One SGD step on L(W + ε) written on the weights: ε of each perturbed layer from the seed, added to the merged
    weight through the parameter that carries it (a LoRA layer's frozen base, or the weight itself), by
    functional_call. Returns the new trainable parameters by name and L(W + ε)."""
    replaced = {}
    for index, layer in enumerate(perturbed_layers(model)):
        weight = layer.weight().detach()
        noise = row_scaled_noise(sigma * weight.float().norm(dim=1) / math.sqrt(weight.shape[1]), weight.shape[1],
                                 noise_seed(seed, step, index)).to(weight.dtype)  # fmt: skip
        module = layer.module.base_layer if layer.kind == "lora" else layer.module
        name = next(n for n, m in model.named_modules() if m is module) + ".weight"
        replaced[name] = module.weight + (noise.T if isinstance(module, Conv1D) else noise)  # Conv1D: (in, out)
    loss = torch.func.functional_call(
        model, replaced, args=(), kwargs=batch, tie_weights=False
    ).loss  # GPT-2's head alone
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable])
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    clip = min(1.0, 1.0 / (float(norm) + 1e-6))  # Trainer's max_grad_norm=1
    return {n: (p - LR * clip * g).detach() for (n, p), g in zip(trainable, grads)}, loss.item()


@pytest.mark.parametrize("make_model", [full_64, lora_64], ids=["full", "lora"])
def test_one_step_equals_a_hand_written_step_on_the_perturbed_loss(tmp_path, make_model):
    """Step 1 of 2 on the cosine schedule (σ_1 = σ/2; step 0 is unperturbed, σ_0 = 0)."""
    model = make_model()
    trainer = flat_trainer(model, lm_data(32), tmp_path, max_steps=2, per_device_train_batch_size=16)
    trainer.train()
    layers = [layer.name for layer in trainer.flat_lora.layers]
    if make_model is lora_64:
        assert layers == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    else:
        assert layers == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                          "transformer.h.0.mlp.c_proj", "lm_head"]  # fmt: skip

    reference = make_model().train()
    expected0, _ = hand_perturbed_step(reference, trainer.seen[0], COMMON["seed"], 0, 0.0)  # σ_0 = 0: a plain step
    with torch.no_grad():
        for name, value in expected0.items():
            dict(reference.named_parameters())[name].copy_(value)
    batch = trainer.seen[1]
    sigma_1 = cosine_sigma(SIGMA, 1, 2)
    assert sigma_1 == pytest.approx(SIGMA / 2)
    expected, loss = hand_perturbed_step(reference, batch, COMMON["seed"], 1, sigma_1)
    got = dict(model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=0, atol=1e-6, msg=name)
    logs = [h for h in trainer.state.log_history if "flat_lora/sigma" in h]
    assert [h["flat_lora/sigma"] for h in logs] == [0.0, pytest.approx(SIGMA / 2)]
    assert logs[1]["loss"] == pytest.approx(loss, abs=1e-6)  # the loss at w + ε
    # and the noise mattered: the unperturbed step 1 is a different step
    unperturbed, _ = hand_perturbed_step(reference, batch, COMMON["seed"], 1, 0.0)
    assert max((unperturbed[n] - expected[n]).abs().max() for n in expected) > 1e-4


@pytest.mark.parametrize("make_model", [full_64, lora_64], ids=["full", "lora"])
def test_weights_after_a_step_are_the_unperturbed_ones_plus_the_update_bit_for_bit(tmp_path, make_model):
    """Nothing is written into the weights: each step's new weight is exactly w − lr·g (g the clipped gradient the
    optimizer used, recorded by a step pre-hook), and a LoRA model's frozen base is bit-identical after 3 steps."""
    model = make_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    history = [params(model)]

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append(params(model))

    trainer = flat_trainer(model, lm_data(48), tmp_path, max_steps=3, per_device_train_batch_size=16,
                           flat_lora_schedule="constant")  # fmt: skip
    trainer.add_callback(Snapshots())
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(trainer.grads) == 3
    for step, grads in enumerate(trainer.grads):
        for key, grad in grads.items():
            name = names[key]
            assert torch.equal(history[step + 1][name], history[step][name].add(grad, alpha=-LR)), (step, name)
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert make_model is full_64 or frozen


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Every micro-batch of a step draws the step's noise (a function of seed, step and layer)."""
    runs = {}
    for micro, accumulate in [(16, 1), (8, 2)]:
        model = lora_64()
        trainer = flat_trainer(model, lm_data(32), tmp_path / f"{micro}", max_steps=2,
                               per_device_train_batch_size=micro, gradient_accumulation_steps=accumulate,
                               flat_lora_schedule="constant")  # fmt: skip
        trainer.train()
        runs[micro] = (params(model), [h["loss"] for h in trainer.state.log_history if "flat_lora/sigma" in h])
    (p16, l16), (p8, l8) = runs[16], runs[8]
    assert l8 == pytest.approx(l16, rel=1e-6)
    for name in p16:
        torch.testing.assert_close(p8[name], p16[name], rtol=0, atol=1e-6, msg=name)


def test_resume_reproduces_the_noise(tmp_path):
    """Interrupted at step 2 of 4 (cosine σ over the 4 steps) and resumed: the same weights as the straight run."""
    kw = dict(max_steps=4, per_device_train_batch_size=8, save_strategy="steps", save_steps=2)

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    straight = lora_64()
    flat_trainer(straight, lm_data(), tmp_path / "straight", **kw).train()
    interrupted = flat_trainer(lora_64(), lm_data(), tmp_path / "interrupted", **kw)
    interrupted.add_callback(StopAt2())
    interrupted.train()
    resumed = lora_64()  # the frozen base as before (a PEFT checkpoint holds the adapters); other adapters
    with torch.no_grad():
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()
    flat_trainer(resumed, lm_data(), tmp_path / "interrupted", **kw).train(
        resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2")
    )
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), lora_64().parameters()))


def test_evaluation_is_untouched_and_the_noise_scales_with_the_rows(tmp_path):
    model = lora_64().eval()
    batch = {"input_ids": torch.randint(0, 32, (2, 6))}
    before = model(**batch).logits
    trainer = flat_trainer(model, lm_data(16), tmp_path, max_steps=1, per_device_train_batch_size=8)
    assert torch.equal(model(**batch).logits, before)  # outside a training step the hooks do nothing
    # inside one, ε = σ ‖w_s‖/√m · ξ: each row's noise norm is about σ‖w_s‖
    weight = trainer.flat_lora.layers[0].weight().detach()
    noise = trainer.flat_lora.noise(0, seed=3, step=7, sigma=SIGMA)
    torch.testing.assert_close(noise, trainer.flat_lora.noise(0, seed=3, step=7, sigma=SIGMA), rtol=0, atol=0)
    ratio = noise.norm(dim=1) / (SIGMA * weight.float().norm(dim=1))
    assert ratio.mean() == pytest.approx(1.0, abs=0.1) and not torch.equal(
        noise, trainer.flat_lora.noise(0, 3, 8, SIGMA)
    )


def test_config_and_model_errors_name_the_fix(tmp_path):
    for sigma in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"flat_lora_sigma=.* must be a finite number > 0"):
            FlatLoRAConfig(output_dir=str(tmp_path), flat_lora_sigma=sigma)
    with pytest.raises(ValueError, match="flat_lora_schedule='linear' is not one of 'cosine', 'constant'"):
        FlatLoRAConfig(output_dir=str(tmp_path), flat_lora_schedule="linear")
    adopted = FlatLoRATrainer(model=gpt2(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert type(adopted.args) is FlatLoRAConfig  # as FAMTrainer adopts one (tests/test_drop_in.py)
    with pytest.raises(TypeError, match=r"FlatLoRATrainer needs args=FlatLoRAConfig\(...\), got Seq2SeqTrainingArg"):
        FlatLoRATrainer(model=gpt2(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to=[]))
    frozen = gpt2().requires_grad_(False)
    with pytest.raises(ValueError, match="found no trainable linear layer .* in GPT2LMHeadModel"):
        perturbed_layers(frozen)
    for field, value, message in (("flat_lora_sigma", "5e-2", "must be a number, not str .*write 5.0e-2"),
                                  ("flat_lora_sigma", True, "must be a number, not bool"),
                                  ("flat_lora_seed", 1.5, "must be a whole number")):  # fmt: skip
        with pytest.raises(TypeError, match=f"{field}=.* {message}"):
            FlatLoRAConfig(output_dir=str(tmp_path), **{field: value})
    dora = get_peft_model(gpt2(), LoraConfig(**{**LORA, "use_dora": True}))
    with pytest.raises(ValueError, match="'.*c_attn' is a DoRA layer .* use plain LoRA"):  # at construction, not step 1
        FlatLoRATrainer(model=dora, args=FlatLoRAConfig(output_dir=str(tmp_path), report_to=[]))


def test_model_init_builds_the_model_that_gets_the_noise(tmp_path):
    """train() builds a new model from model_init (each hyperparameter-search trial too): the noise hooks follow it,
    so the run equals one handed that model directly."""
    data = lm_data(16)
    kw = dict(max_steps=2, per_device_train_batch_size=8, flat_lora_schedule="constant", flat_lora_sigma=0.5)
    template = lora_64()  # copied, so that building the model draws nothing from the RNG the data order uses
    direct = flat_trainer(copy.deepcopy(template), data, tmp_path / "direct", cls=FlatLoRATrainer, **kw)
    direct.train()
    args = FlatLoRAConfig(output_dir=str(tmp_path / "init"), **{**COMMON, **kw})
    built = FlatLoRATrainer(model_init=lambda: copy.deepcopy(template), args=args, train_dataset=data)
    built.train()
    assert built.flat_lora.layers[0].module in list(built.model.modules())
    trained = params(built.model)
    for name, value in params(direct.model).items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


def test_fsdp1_and_zero3_are_refused_naming_the_fix():
    """What FlatLoRAMixin.__init__ checks once Trainer has set up accelerate (neither can start on this CPU: accelerate
    runs FSDP and ZeRO-3 on accelerators only), on stand-ins that say what that check reads."""
    from types import SimpleNamespace

    from fam_hf.flat_lora_trainer import _check_sharding

    def trainer(fsdp=False, fsdp2=False, zero_stage=None):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        accelerator = SimpleNamespace(is_fsdp2=fsdp2, state=SimpleNamespace(deepspeed_plugin=plugin))
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=plugin is not None, accelerator=accelerator)

    with pytest.raises(
        ValueError, match=r"FSDP1 keeps them as flattened shards .* Use FSDP2: fsdp_config=\{'version': 2\}"
    ):
        _check_sharding(trainer(fsdp=True))
    with pytest.raises(ValueError, match=r"ZeRO-3 keeps them as flat partitions .* Use ZeRO-1/2, or FSDP2"):
        _check_sharding(trainer(zero_stage=3))
    for allowed in (trainer(), trainer(fsdp=True, fsdp2=True), trainer(zero_stage=2)):
        _check_sharding(allowed)


@pytest.mark.multiprocess
def test_two_ddp_ranks_draw_the_same_noise_and_equal_one_process(tmp_path):
    """Two gloo ranks (8 examples each) against one process on the 16: the same noise on every rank, so the
    all-reduced gradient is the one-process gradient of L(W + ε) on the global batch."""
    from flat_lora_ddp_worker import train

    launch("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29547",
           str(HERE / "flat_lora_ddp_worker.py"), str(tmp_path))  # fmt: skip
    single = train(tmp_path / "single", per_device_batch=16)
    single_loss = [h["loss"] for h in single.state.log_history if "flat_lora/sigma" in h]
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["world_size"] == 2
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(result["params"][name], value, rtol=0, atol=1e-6, msg=name)
        assert result["losses"] == pytest.approx(single_loss, rel=1e-5)


def test_trl_pair_equals_plain_sft_on_the_perturbed_base(tmp_path, caplog):
    """FlatLoRASFTTrainer (TRL's fused loss) on a LoRA Llama: its adapters after two steps equal those of plain
    SFTTrainer run on a copy whose frozen base weights hold W0 + ε of each step (ε from the same seed, written in
    by a callback), and its own base is never touched; a trainable LM head, which the fused loss never runs, is
    reported."""
    pytest.importorskip("trl")
    from test_trl import llama, sft
    from trl import SFTConfig, SFTTrainer

    from fam_hf.trl import FlatLoRASFTConfig, FlatLoRASFTTrainer

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)

    def make():
        model = llama(dtype=torch.float64)
        torch.manual_seed(5)
        return get_peft_model(model, lora)

    flat = make()
    frozen = {n: p.detach().clone() for n, p in flat.named_parameters() if not p.requires_grad}
    trainer = sft(FlatLoRASFTTrainer, FlatLoRASFTConfig, flat, tmp_path / "flat", max_steps=2,
                  per_device_train_batch_size=8, flat_lora_sigma=0.2, flat_lora_schedule="constant")  # fmt: skip
    trainer.train()

    plain = make()
    noise_of = PerturbedLayers(perturbed_layers(plain))  # ε from plain's own merged weights, as Flat-LoRA's
    bases = [layer.module.base_layer.weight for layer in noise_of.layers]

    class WriteNoise(TrainerCallback):  # W0 + ε_t in the frozen base during step t
        def on_step_begin(self, args, state, control, **kwargs):
            with torch.no_grad():
                for base in bases:
                    base.copy_(frozen[_name(plain, base)])
                noises = [noise_of.noise(i, COMMON["seed"], state.global_step, 0.2) for i in range(len(bases))]
                for base, noise in zip(bases, noises):
                    base.add_(noise.to(base.dtype))

    reference = sft(SFTTrainer, SFTConfig, plain, tmp_path / "plain", max_steps=2, per_device_train_batch_size=8)
    reference.add_callback(WriteNoise())
    reference.train()
    for (name, a), b in zip(plain.named_parameters(), flat.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    for name, value in frozen.items():
        assert torch.equal(dict(flat.named_parameters())[name], value), name
    unperturbed = make()  # the noise matters: plain SFT on W0 takes another step
    sft(SFTTrainer, SFTConfig, unperturbed, tmp_path / "w0", max_steps=2, per_device_train_batch_size=8).train()
    assert max((a - b).abs().max() for a, b in zip(unperturbed.parameters(), flat.parameters())) > 1e-4
    with caplog.at_level("WARNING", logger="fam_hf.trl"):
        sft(FlatLoRASFTTrainer, FlatLoRASFTConfig, llama(), tmp_path / "full", max_steps=1)
    assert "fused LM head never runs the head module, so its weight is not perturbed" in caplog.text


def test_trl_pair_writes_a_flat_lora_card_that_lists_only_the_layers_it_perturbs(tmp_path):
    """FlatLoRASFTTrainer's card (written by save_model, nothing pushed): Flat-LoRA's tags, settings and paper, and
    the perturbed layers without the LM head, which TRL's fused loss never runs."""
    pytest.importorskip("trl")
    from huggingface_hub import ModelCard
    from test_trl import llama, sft

    from fam_hf.trl import FlatLoRASFTConfig, FlatLoRASFTTrainer

    trainer = sft(FlatLoRASFTTrainer, FlatLoRASFTConfig, llama(), tmp_path, max_steps=1, logging_steps=1,
                  flat_lora_schedule="constant")  # fmt: skip
    trainer.train()
    trainer.save_model()
    card = ModelCard.load(tmp_path / "README.md")
    names = [layer.name for layer in trainer.flat_lora.layers]
    assert "lm_head" in names and trainer.flat_lora_layer_names() == names[:-1]
    assert card.data.flat_lora["layers"] == len(names) - 1 and card.data.flat_lora["schedule"] == "constant"
    assert {"flat-lora", "random-weight-perturbation"} <= set(card.data.tags)
    assert "through `fam_hf`'s `FlatLoRASFTTrainer`" in card.text and "| trainer | FlatLoRASFTTrainer |" in card.text
    assert "`lm_head`" not in card.text and "`model.layers.0.self_attn.q_proj`" in card.text
    assert "li2025flatlora" in card.text and "petzka2021relative" not in card.text


def _name(model, parameter):
    return next(n for n, p in model.named_parameters() if p is parameter)


def test_activation_checkpointing_recomputes_the_same_noise(tmp_path):
    """Under non-reentrant activation checkpointing the backward pass reruns each block's forward, hooks included:
    it must draw the same ε (from the seed), so the step equals the one without checkpointing."""
    runs = {}
    for checkpointing in (False, True):
        model = full_64()
        trainer = flat_trainer(model, lm_data(16), tmp_path / str(checkpointing), max_steps=2,
                               per_device_train_batch_size=8, flat_lora_schedule="constant",
                               gradient_checkpointing=checkpointing,
                               gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        trainer.train()
        runs[checkpointing] = params(model)
    for name, value in runs[True].items():
        torch.testing.assert_close(value, runs[False][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.multiprocess
@pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason="this torch's fully_shard cannot run on the CPU ('Stream' object has no attribute 'record_event'; torch 2.6)",
)
def test_two_fsdp2_ranks_perturb_as_one_process(tmp_path):
    """FSDP2 (tests/flat_lora_fsdp_worker.py, two gloo ranks of 8 examples against one process on the 16, two SGD
    steps): a LoRA model sharded as Trainer shards one (every A and B an FSDP unit of its own, so A is resharded by
    the time the LoRA layer's forward hook runs) and a full fine-tune with its tied head. The row scales come from
    the sharded weights before the forward pass, so the weights after the steps are the one-process ones. Tolerance
    1e-8 on float64 weights: the noise, its row scales and the loss are float32, and the ranks sum in another order
    (the differences seen are below 5e-10; the noise moves the weights by more than 1e-4)."""
    out = tmp_path / "fsdp.pt"
    launch("torchrun", "--nproc_per_node", "2", "--master_port", "29548", str(HERE / "flat_lora_fsdp_worker.py"),
           str(out))  # fmt: skip
    results = torch.load(out)
    assert results["lora"]["sharded_in_hook"] == [True, True]
    for variant, result in results.items():
        # the loss is float32 (transformers' causal-LM loss casts the logits to float32)
        torch.testing.assert_close(result["losses"], result["ref_losses"], rtol=1e-6, atol=0, msg=variant)
        for name, value in result["ref_params"].items():
            torch.testing.assert_close(result["params"][name], value, rtol=0, atol=1e-8, msg=f"{variant}: {name}")
        moved = max((result["plain_params"][n] - v).abs().max() for n, v in result["ref_params"].items())
        assert moved > 1e-4, variant
