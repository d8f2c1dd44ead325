import ChunkCipher
import Foundation

/// Alerts and audit records in the formats security tooling reads: AWS
/// Security Finding Format (ASFF, for `aws securityhub
/// batch-import-findings`) and the Open Cybersecurity Schema Framework
/// (OCSF 1.1: Detection Finding for alerts, API Activity for audit records).
public enum SecurityFindings {
    /// kmsfs's version, as the findings' product metadata names it.
    public static let productVersion = "0.6.0"
    static let ocsfVersion = "1.1.0"

    /// Where a finding says it comes from: Security Hub wants an account and
    /// a region even for findings from outside AWS.
    public struct ASFFAccount: Codable, Sendable, Equatable {
        public var accountID: String
        public var region: String
        public init(accountID: String, region: String) {
            self.accountID = accountID
            self.region = region
        }
    }

    /// `t` (seconds since 1970) as ISO 8601 UTC with milliseconds, 2026-12-04T18:19:23.125Z: how kmsfs prints times in JSON.
    public static func iso(_ t: Double) -> String {
        Date(timeIntervalSince1970: t).formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true))
    }

    /// ASFF finding types by alert rule (the namespace/category/classifier taxonomy).
    static let asffTypes: [String: String] = [
        "denial-burst": "Unusual Behaviors/User/Access denials",
        "key-state": "Unusual Behaviors/Application/Use of a disabled key",
        "integrity": "Effects/Data Exposure/Integrity failure",
        "deletion-refused": "Software and Configuration Checks/Key Management/Deletion of a key in use",
        "rotation-overdue": "Software and Configuration Checks/Industry and Regulatory Standards/Key rotation overdue",
    ]

    /// One alert as an ASFF finding. Its id is stable for a rule, subject and
    /// minute, so a re-import updates a finding instead of duplicating it.
    public static func asff(_ alert: Alert, filesystem: ID128, account: ASFFAccount) -> [String: Any] {
        let subject = alert.objectID ?? alert.keyID ?? alert.uid.map { "uid:\($0)" } ?? "filesystem"
        let resource: [String: Any] = alert.keyID.map {
            ["Type": "Other", "Id": "arn:kmsfs:kms:local:\(filesystem.hex):key/\($0)", "Details": ["Other": ["filesystem": filesystem.hex]]]
        } ?? ["Type": "Other", "Id": "arn:kmsfs:filesystem:local:\(filesystem.hex)"]
        var finding: [String: Any] = [
            "SchemaVersion": "2018-10-08",
            "Id": "kmsfs/\(filesystem.hex)/\(alert.rule)/\(subject)/\(Int(alert.time / 60))",
            "ProductArn": "arn:aws:securityhub:\(account.region):\(account.accountID):product/\(account.accountID)/default",
            "GeneratorId": "kmsfs-\(alert.rule)",
            "AwsAccountId": account.accountID,
            "Types": [asffTypes[alert.rule] ?? "Unusual Behaviors/Application"],
            "CreatedAt": iso(alert.time),
            "UpdatedAt": iso(alert.time),
            "Severity": ["Label": alert.severity.uppercased()],
            "Title": "kmsfs: \(alert.rule)",
            "Description": String(alert.message.prefix(1024)),
            "ProductFields": ["kmsfs/rule": alert.rule, "kmsfs/filesystem": filesystem.hex, "ProviderName": "kmsfs", "ProviderVersion": productVersion],
            "Resources": [resource],
            "RecordState": "ACTIVE",
            "Workflow": ["Status": "NEW"],
        ]
        if let uid = alert.uid { finding["UserDefinedFields"] = ["uid": String(uid)] }
        return finding
    }

    static func severityID(_ label: String) -> Int {
        ["informational": 1, "low": 2, "medium": 3, "high": 4, "critical": 5][label.lowercased()] ?? 0
    }

    static func metadata(_ filesystem: ID128) -> [String: Any] {
        ["version": ocsfVersion, "product": ["name": "kmsfs", "vendor_name": "kmsfs", "version": productVersion],
         "tenant_uid": filesystem.hex]
    }

    /// One alert as an OCSF Detection Finding (class 2004).
    public static func ocsf(_ alert: Alert, filesystem: ID128) -> [String: Any] {
        var finding: [String: Any] = [
            "class_uid": 2004, "category_uid": 2, "activity_id": 1, "type_uid": 200401,
            "time": Int64(alert.time * 1000), "severity_id": severityID(alert.severity), "severity": alert.severity.capitalized,
            "status_id": 1, "message": alert.message, "metadata": metadata(filesystem),
            "finding_info": ["uid": "kmsfs/\(filesystem.hex)/\(alert.rule)/\(Int(alert.time * 1000))", "title": "kmsfs: \(alert.rule)",
                             "desc": alert.message, "types": [alert.rule], "created_time": Int64(alert.time * 1000)],
        ]
        if let key = alert.keyID { finding["resources"] = [["uid": key, "type": "kmsfs key", "name": "arn:kmsfs:kms:local:\(filesystem.hex):key/\(key)"]] }
        if let uid = alert.uid { finding["actor"] = ["user": ["uid": String(uid)]] }
        if let object = alert.objectID { finding["unmapped"] = ["object_id": object] }
        return finding
    }

    /// OCSF API Activity's activity: 1 Create, 2 Read, 3 Update, 4 Delete, 99 Other.
    static func activity(_ event: String) -> (id: Int, name: String) {
        if event.hasPrefix("Create") || event == "GenerateDataKey" || event == "Sign" { return (1, "Create") }
        if ["Decrypt", "DescribeKey", "Verify", "GetPublicKey", "Authorize", "IntegrityFailure"].contains(event)
            || event.hasPrefix("List") || event.hasPrefix("Get") { return (2, "Read") }
        if event.hasPrefix("Delete") || event.hasPrefix("ScheduleKeyDeletion") || event.hasPrefix("Revoke") || event.hasPrefix("Retire") { return (4, "Delete") }
        if event.hasPrefix("Rotate") || event.hasPrefix("Enable") || event.hasPrefix("Disable") || event.hasPrefix("Put") || event.hasPrefix("Update")
            || event.hasPrefix("Bind") || event.hasPrefix("Cancel") || event == "ReEncrypt" || event.hasPrefix("Tag") || event.hasPrefix("Untag") { return (3, "Update") }
        return (99, "Other")
    }

    /// One audit record as an OCSF API Activity event (class 6003).
    public static func ocsf(_ record: AuditRecord, filesystem: ID128, hostname: String) -> [String: Any] {
        let (id, name) = activity(record.event)
        let success = record.outcome == "success"
        var event: [String: Any] = [
            "class_uid": 6003, "category_uid": 6, "activity_id": id, "activity_name": name, "type_uid": 600300 + id,
            "time": Int64(record.time * 1000), "severity_id": success ? 1 : (record.outcome == "integrity-failure" ? 5 : 3),
            "status_id": success ? 1 : 2, "status": success ? "Success" : "Failure",
            "api": ["operation": record.event, "service": ["name": "kmsfs"]],
            "cloud": ["provider": "kmsfs", "region": "local"],
            "src_endpoint": ["hostname": hostname],
            "metadata": metadata(filesystem).merging(["uid": "\(filesystem.hex)-\(record.seq)", "sequence": record.seq]) { $1 },
        ]
        // A record without a caller (a schedule, a state poll) is kmsfs's own doing.
        if let uid = record.uid {
            var actor: [String: Any] = ["user": ["uid": String(uid), "groups": record.gid.map { [["uid": String($0)]] } ?? []]]
            if let pid = record.pid { actor["process"] = ["pid": pid, "name": record.process ?? ""] }
            event["actor"] = actor
        } else {
            event["actor"] = ["app_name": "kmsfs"]
        }
        if !success { event["status_detail"] = record.outcome; event["message"] = record.error ?? record.outcome }
        if let key = record.keyID {
            event["resources"] = [["uid": key, "type": "kmsfs key", "name": "arn:kmsfs:kms:local:\(filesystem.hex):key/\(key)",
                                   "version": record.keyVersion.map(String.init) ?? ""]]
        }
        var unmapped: [String: Any] = [:]
        if let object = record.objectID { unmapped["object_id"] = object }
        if let path = record.path { unmapped["path"] = path }
        if let request = record.request { unmapped["request"] = request }
        if !unmapped.isEmpty { event["unmapped"] = unmapped }
        return event
    }

    /// `object` as one line of JSON: keys sorted, slashes not escaped.
    public static func line(_ object: [String: Any]) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
