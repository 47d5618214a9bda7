"""Algorithms: what the training signal is. One module per algorithm, registered in ``ALGORITHMS``.

Each provides ``Config`` (pydantic, ``name`` literal), ``DATA_FORMATS`` (the row formats it trains on), pure loss
functions, ``row_weight(dataset, i)`` (how much a row
weighs in the step's normaliser) and ``step(model, batch, cfg, ctx) -> (loss, metrics)``. The training loop calls
``step`` per micro-batch; it knows nothing about any particular algorithm.
"""

from tuneforge.algorithms import classification, dpo, grpo, online_dpo, orpo, ppo, rejection_sampling, reward, rlaif, sft

ALGORITHMS = {"sft": sft, "reward": reward, "dpo": dpo, "orpo": orpo, "grpo": grpo, "ppo": ppo,
              "rejection_sampling": rejection_sampling, "online_dpo": online_dpo, "rlaif": rlaif,
              "classification": classification}
ALGORITHM_CONFIGS = {name: mod.Config for name, mod in ALGORITHMS.items()}
