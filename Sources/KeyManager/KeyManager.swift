// KeyManager: filled by the KeyManager issue (#3).
