"""Integrations with LLM proxies, on the budget library.

* :mod:`.litellm_tables`: the spend queries for LiteLLM's own tables (a lagging
  :class:`~coordinator.budget.PostgresSpendSource`, and the doctor's batch queries);
* :mod:`.litellm`: :class:`~coordinator.integrations.litellm.BudgetHook`, a LiteLLM proxy
  callback enforcing budgets with reservations (needs the ``litellm`` extra).

Imports :mod:`coordinator` and :mod:`coordinator.budget`, never :mod:`coordinator.lab`.
"""
