import Foundation
import KeyManager

/// Where a CLI's admin requests go: to the daemon of a live mount over its
/// control socket (the daemon authenticates the caller by its peer
/// credentials), or — when no daemon answers — to an `AdminService` over
/// the keystore the CLI opens itself with the passphrase. Either way the
/// same `AdminReply` comes back for the CLI to render. One connection per
/// request, and none made only to probe: the daemon audits every refused
/// connection, so a refused caller leaves one record per request.
public final class AdminClient {
    /// The keystore directory, `CIPHERDIR/.kmsfs`.
    public let keystore: String
    /// Who the requests run as when the keystore is opened here.
    public let principal: Principal
    private let open: () throws -> KeyManager
    /// The service over the keystore opened here, once no daemon answered.
    private var local: AdminService?

    public init(keystore: String, principal: Principal, open: @escaping () throws -> KeyManager) {
        self.keystore = keystore
        self.principal = principal
        self.open = open
    }

    /// The key manager opened here; nil while requests went to a daemon.
    public var manager: KeyManager? { local?.manager }

    public func perform(_ request: AdminRequest) throws -> AdminReply {
        if let local { return try local.perform(request, as: principal) }
        if let reply = try ControlServer.perform(request, directory: keystore) { return reply }
        let service = AdminService(manager: try open())
        local = service
        return try service.perform(request, as: principal)
    }
}
