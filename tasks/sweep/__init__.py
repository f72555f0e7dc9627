"""The sweep's grid (named recipes) and how its rows are judged and ranked."""
