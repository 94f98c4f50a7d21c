"""The portfolio service: positions, balances and PnL from fills."""
