/// The life-cycle rules of DESIGN.md §5 in one table, so the key manager and
/// its tests read the same source of truth.
public enum LifecycleAction: String, CaseIterable, Sendable {
    case generateDataKey = "create files with"
    case unwrapDataKey = "open files with"
    case rewrapFrom = "re-key files away from"
    case rewrapTo = "re-key files onto"
    case rotate = "rotate"
    case enable = "enable"
    case disable = "disable"
    case scheduleDeletion = "schedule deletion of"
    case cancelDeletion = "cancel deletion of"
    case deprecate = "deprecate"
    /// Aliases, tags, policy, grants, bindings, rotation settings, version
    /// retirement and cut-off: everything but describe. A Destroyed key
    /// accepts none of them.
    case change = "change"
}

/// What an action does in a state.
public enum LifecycleOutcome: Equatable, Sendable {
    /// Allowed; the key moves to (or stays in) this state.
    case allowed(KeyState)
    /// Allowed and changes nothing.
    case noOp
    /// Refused, with what the user should do instead.
    case refused(remedy: String)
}

public enum KeyLifecycle {
    /// The outcome of `action` on a key in `state`.
    public static func outcome(of action: LifecycleAction, in state: KeyState, key: String) -> LifecycleOutcome {
        switch (action, state) {
        case (_, .destroyed):
            return .refused(remedy: "a destroyed key is gone for good; restore a keystore backup taken before its destruction")
        case (.generateDataKey, .enabled), (.rewrapTo, .enabled):
            return .allowed(.enabled)
        case (.generateDataKey, .deprecated), (.rewrapTo, .deprecated):
            return .refused(remedy: "new data goes to its successor; bind the directory to another key or run `kmsfs key enable \(key)` to undeprecate it")
        case (.unwrapDataKey, .enabled), (.rewrapFrom, .enabled):
            return .allowed(.enabled)
        case (.unwrapDataKey, .deprecated), (.rewrapFrom, .deprecated):
            return .allowed(.deprecated)
        case (.generateDataKey, .disabled), (.unwrapDataKey, .disabled), (.rewrapFrom, .disabled), (.rewrapTo, .disabled):
            return .refused(remedy: "run `kmsfs key enable \(key)` to use it again")
        case (.generateDataKey, .pendingDeletion), (.unwrapDataKey, .pendingDeletion),
             (.rewrapFrom, .pendingDeletion), (.rewrapTo, .pendingDeletion):
            return .refused(remedy: "run `kmsfs key cancel-deletion \(key)` and then `kmsfs key enable \(key)` to use it again")
        case (.rotate, .enabled):
            return .allowed(.enabled)
        case (.rotate, .disabled):
            return .refused(remedy: "run `kmsfs key enable \(key)` first")
        case (.rotate, .deprecated):
            return .refused(remedy: "a deprecated key wraps no new data; rotate its successor instead")
        case (.rotate, .pendingDeletion):
            return .refused(remedy: "run `kmsfs key cancel-deletion \(key)` first")
        case (.enable, .enabled):
            return .noOp
        case (.enable, .disabled), (.enable, .deprecated):
            return .allowed(.enabled)
        case (.enable, .pendingDeletion):
            return .refused(remedy: "run `kmsfs key cancel-deletion \(key)` first")
        case (.disable, .enabled), (.disable, .deprecated):
            return .allowed(.disabled)
        case (.disable, .disabled):
            return .noOp
        case (.disable, .pendingDeletion):
            return .refused(remedy: "it is already unusable; `kmsfs key cancel-deletion \(key)` leaves it Disabled")
        case (.scheduleDeletion, .enabled), (.scheduleDeletion, .disabled), (.scheduleDeletion, .deprecated):
            return .allowed(.pendingDeletion)
        case (.scheduleDeletion, .pendingDeletion):
            return .refused(remedy: "its deletion is already scheduled; `kmsfs key describe \(key)` shows the date")
        case (.cancelDeletion, .pendingDeletion):
            return .allowed(.disabled)
        case (.cancelDeletion, _):
            return .refused(remedy: "only a key pending deletion can have its deletion cancelled")
        case (.deprecate, .enabled), (.deprecate, .disabled):
            return .allowed(.deprecated)
        case (.deprecate, .deprecated):
            return .refused(remedy: "it is already deprecated; `kmsfs key describe \(key)` shows its successor")
        case (.deprecate, .pendingDeletion):
            return .refused(remedy: "run `kmsfs key cancel-deletion \(key)` first")
        case (.change, let state):
            return .allowed(state)
        }
    }
}
