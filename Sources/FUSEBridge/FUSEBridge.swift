// FUSEBridge: filled by the mount issue (#4).
