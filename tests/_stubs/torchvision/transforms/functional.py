"""Empty: open_clip imports this module; rsitr's tests call none of it."""
