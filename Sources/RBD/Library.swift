import CCeph
#if canImport(Glibc)
import Glibc
#endif

/// librados and librbd, loaded the first time a client connects (Sources/CCeph/include/CCeph.h): a process that
/// never connects (`imgconv convert`) never maps them.
enum CephLibrary {
    /// The loaded functions, or why they could not be loaded. Loaded once; both libraries stay for the process.
    nonisolated(unsafe) static let loaded: Result<UnsafePointer<imgconv_ceph_api>, CephError> = {
        let api = UnsafeMutablePointer<imgconv_ceph_api>.allocate(capacity: 1)
        var error = [CChar](repeating: 0, count: 512)
        guard imgconv_ceph_load(api, &error, error.count) == 0 else {
            api.deallocate()
            let reason = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return .failure(CephError("loading librados and librbd (Debian: apt install librbd1): \(reason); dlopen",
                                      errno: ENOENT))
        }
        return .success(UnsafePointer(api))
    }()

    /// Loads the libraries, or throws why not. Every path to a Ceph call starts with a connection, which calls this.
    static func load() throws(CephError) {
        if case .failure(let e) = loaded { throw e }
    }
}

/// librados' and librbd's functions. Reached only after `CephLibrary.load()` succeeded: every call needs a client
/// or something made from one.
let ceph: imgconv_ceph_api = {
    guard case .success(let api) = CephLibrary.loaded else {
        fatalError("a librados or librbd call before a client connected (CephLibrary.load)")
    }
    return api.pointee
}()
