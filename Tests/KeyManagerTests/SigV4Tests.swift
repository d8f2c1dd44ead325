import Foundation
import Testing
@testable import KeyManager

/// AWS's published SigV4 test suite (the `v4` cases of aws-c-auth's
/// aws-signing-test-suite): credentials AKIDEXAMPLE, region us-east-1,
/// service "service", 2015-08-30T12:36:00Z. The inputs and the expected
/// signatures below are the suite's.
@Suite("SigV4 signing against AWS's published test vectors")
struct SigV4Tests {
    static let date = Date(timeIntervalSince1970: 1_440_938_160)  // 2015-08-30T12:36:00Z
    static func signer(token: String? = nil) -> SigV4Signer {
        SigV4Signer(credentials: .init(accessKeyID: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", sessionToken: token),
                    region: "us-east-1", service: "service")
    }

    struct Vector: CustomTestStringConvertible, Sendable {
        var name: String
        var request: SigV4Signer.Request
        var token: String? = nil
        var signBody = false
        var signature: String
        var testDescription: String { name }
    }

    static let host = ("Host", "example.amazonaws.com")
    static let vectors: [Vector] = [
        Vector(name: "get-vanilla", request: .init(method: "GET", path: "/", headers: [host]),
               signature: "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        Vector(name: "post-vanilla", request: .init(method: "POST", path: "/", headers: [host]),
               signature: "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        Vector(name: "get-vanilla-query-order-key-case",
               request: .init(method: "GET", path: "/", query: [("Param2", "value2"), ("Param1", "value1")], headers: [host]),
               signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        Vector(name: "post-header-key-sort", request: .init(method: "POST", path: "/", headers: [host, ("My-Header1", "value1")]),
               signature: "c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c"),
        Vector(name: "get-vanilla-with-session-token", request: .init(method: "GET", path: "/", headers: [host]),
               token: "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267",
               signature: "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"),
        Vector(name: "get-vanilla-utf8-query", request: .init(method: "GET", path: "/", query: [("\u{1234}", "bar")], headers: [host]),
               signature: "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04"),
        Vector(name: "get-space-normalized", request: .init(method: "GET", path: "/example space/", headers: [host]),
               signature: "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741"),
        Vector(name: "post-x-www-form-urlencoded",
               request: .init(method: "POST", path: "/", headers: [("Content-Type", "application/x-www-form-urlencoded"), host, ("Content-Length", "13")],
                              body: Array("Param1=value1".utf8)),
               signBody: true, signature: "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"),
    ]

    @Test("each vector's Authorization header carries the suite's signature and signed headers", arguments: vectors)
    func signature(_ vector: Vector) {
        let added = Self.signer(token: vector.token).sign(vector.request, at: Self.date, contentHashHeader: vector.signBody)
        let authorization = added.first { $0.0 == "Authorization" }?.1 ?? ""
        #expect(authorization.hasSuffix("Signature=" + vector.signature), "\(authorization)")
        #expect(authorization.hasPrefix("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders="))
        #expect(added.contains { $0 == ("X-Amz-Date", "20150830T123600Z") })
        #expect(added.contains { $0.0 == "X-Amz-Security-Token" } == (vector.token != nil))
    }

    @Test("get-vanilla: the canonical request and the string to sign are the suite's, byte for byte")
    func intermediateSteps() {
        let signer = Self.signer()
        let canonical = signer.canonicalRequest(.init(method: "GET", path: "/", headers: [Self.host]), at: Self.date)
        #expect(canonical == "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(signer.stringToSign(canonical, at: Self.date)
                == "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63")
    }

    @Test("a changed byte anywhere changes the signature")
    func sensitivity() {
        let base = SigV4Signer.Request(method: "POST", path: "/", headers: [Self.host, ("X-Amz-Target", "TrentService.Decrypt")], body: Array("{}".utf8))
        let reference = Self.signer().sign(base, at: Self.date).last!.1
        var body = base
        body.body = Array("{ }".utf8)
        var header = base
        header.headers[1].1 = "TrentService.Encrypt"
        #expect(Self.signer().sign(body, at: Self.date).last!.1 != reference)
        #expect(Self.signer().sign(header, at: Self.date).last!.1 != reference)
        #expect(Self.signer().sign(base, at: Self.date.addingTimeInterval(86_400)).last!.1 != reference)
    }
}
