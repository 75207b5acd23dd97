#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A system call on a file failed: the operation, the path and the errno, with what to do where there is
/// something to do (a full file system).
public struct FileError: Error, Equatable, Sendable, CustomStringConvertible {
    public var operation: String
    public var path: String
    public var errno: Int32

    public init(_ operation: String, path: String, errno: Int32) {
        self.operation = operation
        self.path = path
        self.errno = errno
    }

    public var description: String {
        var hint = ""
        if errno == ENOSPC || errno == EDQUOT { hint = ": the file system is full; free space or choose another directory" }
        return "\(operation) '\(path)' failed: \(errnoName(errno)) (\(String(cString: strerror(errno))))\(hint)"
    }
}

/// The symbolic name of an errno value ("ENOENT"), for messages and logs.
public func errnoName(_ err: Int32) -> String {
    switch err {
    case EPERM: return "EPERM"
    case ENOENT: return "ENOENT"
    case EIO: return "EIO"
    case EBADF: return "EBADF"
    case ENOMEM: return "ENOMEM"
    case EACCES: return "EACCES"
    case EEXIST: return "EEXIST"
    case EXDEV: return "EXDEV"
    case ENOTDIR: return "ENOTDIR"
    case EISDIR: return "EISDIR"
    case EINVAL: return "EINVAL"
    case EFBIG: return "EFBIG"
    case ENOSPC: return "ENOSPC"
    case EROFS: return "EROFS"
    case ENXIO: return "ENXIO"
    case EINTR: return "EINTR"
    case EDQUOT: return "EDQUOT"
    case ENAMETOOLONG: return "ENAMETOOLONG"
    case EBUSY: return "EBUSY"
    case EAGAIN: return "EAGAIN"
    case ERANGE: return "ERANGE"
    case ENOTEMPTY: return "ENOTEMPTY"
    case ETIMEDOUT: return "ETIMEDOUT"
    case ECONNREFUSED: return "ECONNREFUSED"
    case ENOTCONN: return "ENOTCONN"
    case ESHUTDOWN: return "ESHUTDOWN"
    case EOPNOTSUPP: return "EOPNOTSUPP"
    case ENOSYS: return "ENOSYS"
    case EDOM: return "EDOM"
    default: return "errno \(err)"
    }
}
