"""What a training method is, in one table. Everything else reads it: the CLI's sub-commands and the Makefile's
targets, the recipe's method sections and their checks against TRL's config, the trainer's construction, the
data each method reads, the memory planner's terms and whether a run ends in a chat model to export.

Adding a method is one row here, its recipe section, and its tests.
"""
import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    help: str
    module: str           # where TRL keeps its config and trainer
    config: str           # the config class: the recipe section's keys are its fields
    trainer: str          # the trainer class
    source: str           # the config's file inside the trl package (its fields are read without importing TRL)
    data: str             # what it trains on: "pairs", "chat" (also pairs' chosen side), "unpaired", "prompts"
    reference: bool = False  # takes ref_model=None: the reference is the model with its adapters off
    paired: bool = False     # chosen and rejected go through the model together (memory: twice the tokens)
    online: bool = False     # samples replies to prompts and learns from a reward (the recipe's rewards section)
    chat_model: bool = True  # ends in a chat model: merged, GGUF, smoke; False: a scorer (no export)

    def classes(self):
        """(config class, trainer class), imported (TRL: seconds)."""
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.trainer)


METHODS = {m.name: m for m in (
    Method("sft", "supervised fine-tuning", "trl", "SFTConfig", "SFTTrainer", "trainer/sft_config.py", "chat"),
    Method("dpo", "DPO", "trl", "DPOConfig", "DPOTrainer", "trainer/dpo_config.py", "pairs",
           reference=True, paired=True),
    Method("orpo", "ORPO (no reference model)", "trl.experimental.orpo", "ORPOConfig", "ORPOTrainer",
           "experimental/orpo/orpo_config.py", "pairs", paired=True),  # experimental upstream
    Method("kto", "KTO (unpaired data)", "trl", "KTOConfig", "KTOTrainer", "trainer/kto_config.py", "unpaired",
           reference=True),
    Method("reward", "a reward model (no export)", "trl", "RewardConfig", "RewardTrainer",
           "trainer/reward_config.py", "pairs", paired=True, chat_model=False),
    Method("grpo", "GRPO against a reward (online: sampled replies scored)", "trl", "GRPOConfig", "GRPOTrainer",
           "trainer/grpo_config.py", "prompts", online=True),
    Method("rloo", "RLOO against a reward (online: sampled replies scored)", "trl", "RLOOConfig", "RLOOTrainer",
           "trainer/rloo_config.py", "prompts", online=True),
)}
ONLINE = tuple(name for name, m in METHODS.items() if m.online)

# Methods a user may ask for that are not offered, and why: one sentence, said by the CLI, `make` and a recipe.
NOT_OFFERED = {
    "ppo": "PPO is not offered: TRL removed its PPOTrainer and value-head models in huggingface/trl#7020 (the pinned "
           "TRL 1.15 has neither), and a copy kept here would be a second training path nobody maintains; RLHF "
           "against a reward model runs as `make rloo` or `make grpo` (README: Online methods), with a reward run "
           "as the reward, as PPO would use it",
}
