// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "kmsfs",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "kmsfs", targets: ["kmsfs"]),
        .library(name: "FUSEBridge", targets: ["FUSEBridge"]),
        .library(name: "ChunkCipher", targets: ["ChunkCipher"]),
        .library(name: "KeyManager", targets: ["KeyManager"]),
        .library(name: "EncryptedFS", targets: ["EncryptedFS"]),
        .library(name: "Administration", targets: ["Administration"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
    ],
    targets: [
        .systemLibrary(name: "CFUSE", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CLinux"),
        .systemLibrary(name: "COpenSSL", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        // Hand-written C over the standard PKCS#11 API (types from p11-kit's pkcs11.h; modules loaded with dlopen).
        .target(name: "CPKCS11", cSettings: [.unsafeFlags(["-I/usr/include/p11-kit-1"])]),
        // Hand-written hooks on libfuse's raw I/O for what libfuse 3.14 cannot negotiate (FUSE_HANDLE_KILLPRIV_V2).
        .target(name: "CFUSEIO", dependencies: ["CFUSE"]),
        .target(name: "FUSEBridge", dependencies: [
            "CFUSE", "CFUSEIO",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // Hand-written: an OpenSSL allocator that keeps key schedules in the secure heap (see keymemory.c).
        .target(name: "CKeyMemory", linkerSettings: [.linkedLibrary("crypto")]),
        .target(name: "ChunkCipher", dependencies: ["COpenSSL", "CKeyMemory"]),
        .target(name: "KeyManager", dependencies: [
            "ChunkCipher", "COpenSSL", "CPKCS11",
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "EncryptedFS", dependencies: [
            "FUSEBridge", "ChunkCipher", "KeyManager", "CLinux",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // The admin plane: typed requests and replies, their service, and the control socket that carries them.
        .target(name: "Administration", dependencies: [
            "EncryptedFS", "KeyManager", "ChunkCipher", "CLinux",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "kmsfs", dependencies: [
            "Administration", "EncryptedFS", "KeyManager", "ChunkCipher", "FUSEBridge", "CLinux",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "kmsfs-bench", dependencies: ["ChunkCipher", "KeyManager"], path: "bench/Sources/kmsfs-bench"),
        .testTarget(name: "ChunkCipherTests", dependencies: ["ChunkCipher", "COpenSSL"], exclude: ["Fixtures"]),
        .testTarget(name: "MountTests"),
        .testTarget(name: "FUSEBridgeTests", dependencies: ["FUSEBridge", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "EncryptedFSTests", dependencies: [
            "EncryptedFS", "FUSEBridge", "KeyManager", "ChunkCipher",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        .testTarget(name: "CLITests", dependencies: ["KeyManager", "ChunkCipher"]),
        .testTarget(name: "AdministrationTests", dependencies: ["Administration", "EncryptedFS", "KeyManager", "ChunkCipher"]),
        .testTarget(name: "KeyManagerTests", dependencies: ["KeyManager", "ChunkCipher", .product(name: "GRDB", package: "GRDB.swift")]),
    ]
)
