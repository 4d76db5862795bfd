# LiteLLM resolves `callbacks:` from files next to config.yaml: this names the hook instance,
# configured by the RESEED_LITELLM_* environment (HookConfig.from_env).
from coordinator.integrations.litellm import BudgetHook

budget_hook = BudgetHook()
