"""TRL's DPOTrainer configured as the project's training step: the reference the step is checked against.

`make_trainer` builds TRL's DPOTrainer with the run's hyperparameters and everything the project's own
step (`engine`) does the same way — conversational pairs, keep_end truncation, fp32 master weights with
bf16 autocast on CUDA, no gradient checkpointing, and, when the pairs carry the base model's log-probs,
no reference model. `tests/test_engine.py` trains both on the same batches and compares losses, metrics
and weights; `benchmarks/dpo_throughput.py` times TRL as users run it against the project's step.
"""

from pathlib import Path

import pandas as pd

from prism_assets.training.logps import messages
from prism_assets.training.run_folder import REFERENCE_COLUMNS
from prism_assets.training.settings import RunConfig


def _precomputed_reference_trainer():
    from trl import DPOTrainer

    class PrecomputedReferenceDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on pairs that already carry ref_chosen_logps / ref_rejected_logps.

        With `precompute_ref_log_probs=True` TRL loads no reference model and reads those columns, but
        would first compute them itself (and then fail on the duplicated columns): they are there already.
        """

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    return PrecomputedReferenceDPOTrainer


def make_trainer(cfg: RunConfig, model, tokenizer, train_pairs: pd.DataFrame, use_cuda: bool, callbacks: list):
    """The DPO trainer of a run, as the project configures it: TRL's DPOTrainer, fp32 master weights with bf16
    autocast on CUDA, keep_end truncation, no gradient checkpointing unless asked, and — when the pairs carry
    the base model's log-probs — no reference model. The benchmark times exactly this."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    precomputed = set(REFERENCE_COLUMNS) <= set(train_pairs.columns)
    dataset = Dataset.from_dict(
        {
            "prompt": [messages(p) for p in train_pairs["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in train_pairs["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in train_pairs["rejected"]],
            **({c: train_pairs[c].astype("float32").tolist() for c in REFERENCE_COLUMNS} if precomputed else {}),
        }
    )
    args = DPOConfig(
        output_dir=str(Path(cfg.output_dir) / "trainer"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_cuda,
        use_cpu=not use_cuda,
        max_length=cfg.max_length,
        truncation_mode="keep_end",  # the truncation logps.tokenize_pairs reproduces for references and held-out pairs
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,
        # With the base model's log-probs in the pairs, no reference model is loaded or run during training.
        precompute_ref_log_probs=precomputed,
    )
    trainer = (_precomputed_reference_trainer() if precomputed else DPOTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )
    return trainer
