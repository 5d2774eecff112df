"""Before the run: will a recipe fit (memory model), model shapes, the rehearsed card, the machine probe."""
