"""lightning-metafed's Flower app (ServerApp and ClientApp)."""
