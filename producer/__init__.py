"""VGGish embedding producer: plans chunks, enqueues them, follows progress and finalizes."""
