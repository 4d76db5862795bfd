"""An LLM proxy pod enforcing budgets with BudgetGuard (see ``app.py``)."""
