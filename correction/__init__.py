"""The torch science core of mecs: host models, networks, emulator, training."""
