"""Peak memory of a policy + frozen reference setup: separate reference copy vs LoRA-shared reference.

    HF_HUB_OFFLINE=1 python benchmarks/lora_memory.py                  # ~30 s on 2 CPU cores

Model: a ~70M-parameter Llama built from a config (hidden 768, 8 layers, vocabulary 8192), so
weights, gradients and optimizer states dominate and activations (batch 2 x <= 32 tokens) are
small (at batch 4 x 64 the activations of the 8 layers add ~130 MiB to every setup's peak). Every setup trains ``--steps`` real ``lightning_irl`` steps, each computing the reference's
log-probs of the batch (as a KL-regularised method does) and the policy's SFT loss, backward and
AdamW step. Each setup runs in its own fresh subprocess; memory is the process's peak resident
set size (``ru_maxrss``) minus its resident size just before the models are built (imports,
tokenizer and data already loaded). tracemalloc would miss torch's allocations. The child runs
with ``MALLOC_MMAP_THRESHOLD_=65536``: large tensors then go straight back to the OS when freed,
instead of glibc's growing threshold keeping freed memory resident (RSS would otherwise creep
up step after step and measure the allocator, not the tensors).

Setups:
- ``full+copy``:   full fine-tuning, reference = separate frozen copy (``needs_reference``)
- ``lora+copy``:   LoRA policy, reference = a separate frozen deep copy of the PeftModel (what an
                   algorithm gets if it copies the policy instead of using ``reference_mode``)
- ``lora+shared``: LoRA policy, reference = the same base weights with the adapter off
                   (``IRLModule.reference_mode`` / ``reference_logprobs``)

Printed: MiB per setup and the ratios lora+shared / lora+copy (the effect of sharing the
reference, target <= 0.6) and lora+shared / full+copy (what a user sees switching to LoRA).

This is an *ablation* inside ``lightning_irl``, not a comparison with another library:
``lora+copy`` is a strawman built here (a deep copy of the PeftModel that no shipped algorithm
makes) to isolate what sharing the base weights saves. No competitor is measured; read
lora+shared / lora+copy as "the cost of not sharing", not as "faster/smaller than X".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
         "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 128}
SETUPS = ["full+copy", "lora+copy", "lora+shared"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child(setup: str, folder: str, steps: int) -> dict:
    from _scale_common import make_dataset, quiet_trainer

    import lightning as L
    import torch

    from lightning_irl.algorithms import SFT, OptimizerSpec
    from lightning_irl.data import DemonstrationDataModule
    from lightning_irl.models.spec import LoraSpec, ModelSpec
    from lightning_irl.objectives.logprobs import token_logprobs

    torch.set_num_threads(1)
    ds = make_dataset(folder, n=64, min_len=8, max_len=32, vocab=8192)

    class PolicyAndReference(SFT):
        needs_reference = setup == "full+copy"

        def configure_model(self):
            super().configure_model()
            if setup == "lora+copy" and getattr(self, "reference", None) is None:
                self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()

        def training_step(self, batch, batch_idx):
            if setup == "lora+copy":
                with torch.no_grad():
                    ref = token_logprobs(self.reference, batch["input_ids"], batch["attention_mask"])
            else:
                ref = self.reference_logprobs(batch["input_ids"], batch["attention_mask"])
            assert not ref.requires_grad
            super().training_step(batch, batch_idx)

    spec = ModelSpec(config=dict(MODEL), tokenizer=ds["tokenizer"], seed=0,
                     lora=LoraSpec(r=16, alpha=32) if setup.startswith("lora") else None)
    module = PolicyAndReference(policy=spec, optimizer=OptimizerSpec(lr=1e-5), export=False)
    data = DemonstrationDataModule(train_file=ds["train_file"], batch_size=2, max_length=32, shuffle=False)
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    L.seed_everything(0)
    baseline = rss_mib()
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(module, datamodule=data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in module.policy.parameters())
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    reference = getattr(module, "reference", None)
    return {"setup": setup, "baseline_mib": baseline, "peak_mib": peak, "delta_mib": peak - baseline,
            "params": params, "trainable": trainable,
            "reference_params": sum(p.numel() for p in reference.parameters()) if reference is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.folder, args.steps)), flush=True)
        return
    results = {}
    for setup in SETUPS:
        folder = tempfile.mkdtemp(prefix="lora_mem_")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", setup, "--folder", folder,
                               "--steps", str(args.steps)], capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{setup} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[setup] = json.loads(line[0][len("RESULT "):])
        r = results[setup]
        print(f"{setup:12s} policy {r['params'] / 1e6:.1f}M params ({r['trainable'] / 1e6:.2f}M trainable), "
              f"separate reference {r['reference_params'] / 1e6:.1f}M: peak RSS {r['peak_mib']:.0f} MiB, "
              f"baseline {r['baseline_mib']:.0f} MiB, setup {r['delta_mib']:.0f} MiB", flush=True)
    shared, lora_copy, full = (results[s]["delta_mib"] for s in ("lora+shared", "lora+copy", "full+copy"))
    print(f"\nlora+shared / lora+copy = {shared / lora_copy:.2f}   "
          "(ablation, not a comparison: the cost of not sharing the reference; target <= 0.6)")
    print(f"lora+shared / full+copy = {shared / full:.2f}   (LoRA + shared reference vs full fine-tuning + copy)")


if __name__ == "__main__":
    main()
