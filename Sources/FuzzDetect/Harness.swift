import FuzzKit
import ImageFormats

/// libFuzzer entry point: the bytes are a hostile image of unknown format (detection decides).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzKit.run(Array(UnsafeBufferPointer(start: data, count: size)), declared: nil)
    return 0
}
