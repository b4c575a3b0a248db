"""bf16 training keeps its updates: fp32 master weights (one device) and FSDP2 mixed precision, at DPO's learning
rates and a real model's weight scale (std 0.02), checked against an fp32 run of the same recipe; the guard metric
and warning; exact resume with the master weights.

Why: an AdamW step is about lr (5e-7 here); a bf16 weight of 0.02 is stored with a spacing of 1.2e-4, so applied to
the bf16 weight itself the step rounds away (``master_dtype: bf16``, the old behaviour, is the failing control).
"""

import logging
import shutil

import pytest
import torch
from conftest import run_distributed_in_process
from helpers import logged
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dpo_components.data import preference_dataset
from dpo_components.data.collate import preference_collator
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import IPOLoss
from dpo_components.precision import MasterWeights
from dpo_components.settings import ConfigError, RecipeSettings
from dpo_components.tiny.model import save_hf_checkpoint, tiny_llama
from dpo_components.tiny.tokenizer import tiny_tokenizer
from recipes.full_dpo_distributed import FullDPORecipeDistributed
from recipes.ipo_single_device import IPORecipeSingleDevice
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed
from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

LR, STEPS = 5e-7, 4


@pytest.fixture(scope="module")
def random_start(tmp_path_factory):
    """The tiny model with every weight matrix drawn from N(0, 0.02) (a released model's scale; the trained tiny
    SFT model's weights are larger), rounded to bf16 so that fp32 and bf16 runs start from the same weights."""
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn_like(param).mul_(0.02).to(torch.bfloat16).float())
    return save_hf_checkpoint(model, tmp_path_factory.mktemp("random_start")), model.state_dict()


def config(recipe_cfg, name, random_start, out, eval_samples=0, **overrides):
    settings = {"checkpointer.checkpoint_dir": str(random_start[0]), "optimizer.lr": LR, "output_dir": str(out),
                "lr_scheduler.num_warmup_steps": 0, "max_steps_per_epoch": STEPS, "eval_samples": eval_samples}
    if not eval_samples:
        settings["eval_dataset"] = None  # fmt: skip
    return recipe_cfg(f"recipe_configs/tiny/{name}.yaml", **{**settings, **overrides})


def update_error(weights, fp32_weights, start):
    """|| (w - w0) - (w_fp32 - w0) || / || w_fp32 - w0 || over all trained weights: 0 = the fp32 run's update."""
    num = den = 0.0
    for name, w32 in fp32_weights.items():
        num += ((weights[name].float() - start[name]) - (w32 - start[name])).pow(2).sum().item()
        den += (w32 - start[name]).pow(2).sum().item()
    return (num / den) ** 0.5


def trained(recipe):
    """The weights the optimizer stepped (the fp32 master copies where there are), by parameter name, fp32."""
    master = recipe._master
    return {name: p.detach().float() for name, p in zip(master._names, master.params)}


def fp32_eval_loss(weights, tiny_setup):
    """IPO loss of each of ``weights`` on 128 training pairs, against the first as the reference, in fp32 (free of
    bf16 compute noise, which at a random start is larger than 4 small steps' effect on the logged loss)."""
    model = tiny_llama()
    data = preference_dataset(tiny_tokenizer(), source="json", data_files=str(tiny_setup / "data/train.jsonl"),
                              split="train", max_length=96, max_prompt_length=32)  # fmt: skip
    batch = preference_collator(tiny_tokenizer().pad_id)([data[i] for i in range(128)])
    out = []
    for state in weights:
        model.load_state_dict(state)
        with torch.no_grad():
            out.append(concatenated_logprobs(model, batch, 256, False))
    return [IPOLoss(beta=0.5)(policy, out[0]).losses.mean().item() for policy in out]


@pytest.mark.recipe
def test_full_parameter_bf16_follows_the_fp32_run_only_with_master_weights(recipe_cfg, random_start, tiny_setup,
                                                                           tmp_path, caplog):  # fmt: skip
    runs, shares = {}, {}
    for tag, dtype, master in [("fp32", "fp32", "fp32"), ("bf16", "bf16", None), ("in_place", "bf16", "bf16")]:
        cfg = config(recipe_cfg, "ipo_single_device", random_start, tmp_path / tag, dtype=dtype, master_dtype=master,
                     batch_size=8, **{"reference.mode": "model"})  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            recipe = IPORecipeSingleDevice(cfg)
            recipe.setup(cfg)
        warned = "round away" in caplog.text
        assert warned == (tag == "in_place"), caplog.text  # the setup warning, only where updates are lost
        recipe.train()
        runs[tag] = trained(recipe)
        shares[tag] = [row["unchanged_weight_share"] for _, row in sorted(logged(cfg).items())]
    start = {name: random_start[1][name].float() for name in runs["fp32"]}
    assert all(w.dtype == torch.float32 for w in runs["bf16"].values())  # the default: fp32 master weights

    assert update_error(runs["bf16"], runs["fp32"], start) < 0.25  # measured 0.07 (bf16 gradients)
    assert update_error(runs["in_place"], runs["fp32"], start) > 0.9  # measured 0.996: nothing moved
    # the guard: fp32 leaves ~1% unchanged (Adam's eps, tiny gradients); bf16 in place ~99%
    assert max(shares["bf16"]) < max(shares["fp32"]) + 0.05 < 0.1
    assert min(shares["in_place"]) > 0.9
    # the loss the trained weights reach: bf16 with master weights moves it as fp32 does (measured: 8.3e-4 both,
    # ratio 1.001), in place 1% of that
    start_loss, fp32_loss, bf16_loss, in_place_loss = fp32_eval_loss(
        [start, runs["fp32"], runs["bf16"], runs["in_place"]], tiny_setup
    )
    assert start_loss - fp32_loss > 1e-4
    assert abs((start_loss - bf16_loss) / (start_loss - fp32_loss) - 1) < 0.3
    assert abs((start_loss - in_place_loss) / (start_loss - fp32_loss)) < 0.2


@pytest.mark.recipe
def test_lora_bf16_resumes_exactly_with_its_master_weights(recipe_cfg, random_start, tmp_path):
    settings = {"dtype": "bf16", "save_every_n_steps": 2, "gradient_accumulation_steps": 2, "batch_size": 8,
                "optimizer.lr": 5e-6}  # fmt: skip
    cfg = config(recipe_cfg, "lora_dpo_single_device", random_start, tmp_path / "out", **settings)
    full = LoRADPORecipeSingleDevice(cfg)
    full.setup(cfg)
    full.train()
    state = torch.load(tmp_path / "out/step_2/recipe_state.pt", weights_only=True)
    assert {v.dtype for v in state["master_weights"].values()} == {torch.float32}
    assert load_file(tmp_path / "out/step_2/adapter/adapter_model.safetensors").popitem()[1].dtype == torch.bfloat16
    # lora_a (Kaiming, ~0.06) moves: its bf16 copy alone would not take 5e-6 steps
    a_name = next(n for n in full._master._names if "lora_a" in n)
    assert not torch.equal(full._master.state_dict()[a_name], state["master_weights"][a_name])

    shutil.rmtree(tmp_path / "out/step_4")  # as if killed after step 2
    resumed_cfg = OmegaConf.merge(cfg, {"resume_from_checkpoint": True})
    resumed = LoRADPORecipeSingleDevice(resumed_cfg)
    resumed.setup(resumed_cfg)
    resumed.train()
    for a, b in zip(full._master.params, resumed._master.params):
        assert torch.equal(a, b)
    for (name, a), b in zip(full._model.named_parameters(), resumed._model.parameters()):
        assert torch.equal(a, b), name

    with pytest.raises(ConfigError, match="master_dtype: 'fp32' in the checkpoint, '<not set>' now"):
        in_place = OmegaConf.merge(resumed_cfg, {"master_dtype": "bf16"})
        LoRADPORecipeSingleDevice(in_place).setup(in_place)


@pytest.mark.recipe
def test_fsdp2_keeps_fp32_shards_under_bf16_compute(recipe_cfg, random_start, tmp_path):
    """Full: fp32 sharded parameters follow the fp32 run, the consolidated HF weights are bf16, eval samples run
    (KV caches in the compute dtype); LoRA: fp32 adapter shards, a bf16 PEFT file."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = config(recipe_cfg, "full_dpo_distributed", random_start, tmp_path / dtype, dtype=dtype, eval_samples=2)
        recipe = run_distributed_in_process(FullDPORecipeDistributed, cfg, tmp_path / f"pg_{dtype}")
        runs[dtype] = {name: w.full_tensor() for name, w in trained(recipe).items()}
    start = {name: random_start[1][name].float() for name in runs["fp32"]}
    assert update_error(runs["bf16"], runs["fp32"], start) < 0.25
    hf = load_file(next((tmp_path / "bf16").glob("step_*/model-00001-of-00001.safetensors")))
    assert {t.dtype for t in hf.values()} == {torch.bfloat16}
    assert "eval/samples/kl" in logged(cfg)[STEPS]

    cfg = config(recipe_cfg, "lora_dpo_distributed", random_start, tmp_path / "lora", dtype="bf16",
                 **{"optimizer.lr": 5e-6})  # fmt: skip
    recipe = run_distributed_in_process(LoRADPORecipeDistributed, cfg, tmp_path / "pg_lora")
    dtypes = {name: p.dtype for name, p in recipe._model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    peft = load_file(next((tmp_path / "lora").glob("step_*/adapter/adapter_model.safetensors")))
    assert {t.dtype for t in peft.values()} == {torch.bfloat16}
    assert max(row["unchanged_weight_share"] for row in logged(cfg).values()) < 0.05


@pytest.mark.recipe
def test_master_dtype_is_checked(recipe_cfg):
    cfg = recipe_cfg(master_dtype="bf16")  # dtype fp32: bf16 master weights would be a downcast
    with pytest.raises(ConfigError, match="master_dtype must be fp32 .* or the dtype"):
        RecipeSettings.from_config(cfg)
    assert RecipeSettings.from_config(recipe_cfg(dtype="bf16")).master_dtype == torch.float32


def test_master_weights_accumulate_gradients_in_fp32():
    """Micro-batch gradients are summed in fp32: 64 bf16 gradients of 1 + 2^-7 sum to exactly 64.5; summed in bf16
    (spacing 2^-1 at 64) the 2^-7 parts are lost once the sum passes 2."""
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = MasterWeights([("w", param)], torch.float32)
    for _ in range(64):
        param.grad = torch.full_like(param, 1 + 2**-7)  # exactly representable in bf16
        master.accumulate_grads()
    assert param.grad is None and master.params[0].grad.dtype == torch.float32
    torch.testing.assert_close(master.params[0].grad, torch.full((4,), 64.5))


@pytest.mark.recipe
def test_fsdp2_bf16_resume_is_exact_with_its_fp32_shards(recipe_cfg, random_start, tmp_path):
    settings = {"dtype": "bf16", "save_every_n_steps": 2}
    cfg = config(recipe_cfg, "full_dpo_distributed", random_start, tmp_path / "full", **settings)
    full = run_distributed_in_process(FullDPORecipeDistributed, cfg, tmp_path / "pg_full")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full/step_2", resumed_dir / "step_2")  # as if killed after step 2
    resumed_cfg = OmegaConf.merge(cfg, {"output_dir": str(resumed_dir), "resume_from_checkpoint": True})
    resumed = run_distributed_in_process(FullDPORecipeDistributed, resumed_cfg, tmp_path / "pg_resumed")
    assert min(logged(resumed_cfg)) == 3
    for (name, a), b in zip(full._model.named_parameters(), resumed._model.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a.full_tensor(), b.full_tensor()), name


def test_an_optimizer_that_cannot_step_master_copies_is_refused():
    """torchao's CPUOffloadOptimizer steps from backward hooks, which the master copies' gradients never pass
    (it needs CUDA to be built, so the check is given one without its constructor)."""
    from torchao.optim import CPUOffloadOptimizer

    param = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    offloaded = object.__new__(CPUOffloadOptimizer)
    with pytest.raises(ConfigError, match="CPUOffloadOptimizer steps only parameters whose gradients arrive"):
        MasterWeights([("w", param)], torch.float32).check_optimizer(offloaded)
    MasterWeights([("w", param)], torch.bfloat16).check_optimizer(torch.optim.AdamW([param], lr=1e-3))  # in place
