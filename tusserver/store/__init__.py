"""Redis: the client, upload records and key names, Lua scripts, the steps, the embedded Valkey."""
