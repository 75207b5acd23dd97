import Foundation
import FuzzKit
import Testing
@testable import ImageFormats

/// Every input a fuzzer ever crashed on (fuzz/regressions/), replayed through the harnesses' path, under every
/// declaration. Each ended in a crash once (arithmetic overflow on forged offsets); now each must end in a
/// verdict or a typed error.
@Suite("fuzz regressions")
struct FuzzRegressionTests {
    static let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("fuzz").path

    static let inputs: [String] = ((try? FileManager.default.contentsOfDirectory(atPath: dir + "/regressions")) ?? [])
        .sorted()

    @Test(arguments: inputs)
    func replay(_ name: String) throws {
        let bytes = Array(FileManager.default.contents(atPath: Self.dir + "/regressions/" + name)!)
        for declared in [nil] + ImageFormat.allCases.map(Optional.some) {
            FuzzKit.run(bytes, declared: declared)
        }
        let v = ImageInspector.inspect(storage: MemoryStorage(bytes), declared: nil).verdict
        #expect(!v.safe, "\(name) is a hostile input and must not be judged safe")
    }

    @Test func regressionsExist() {
        #expect(Self.inputs.count >= 3)
    }

    @Test(arguments: ((try? FileManager.default.contentsOfDirectory(atPath: dir + "/seeds")) ?? []).sorted())
    func seedsRunCleanly(_ name: String) throws {
        let bytes = Array(FileManager.default.contents(atPath: Self.dir + "/seeds/" + name)!)
        FuzzKit.run(bytes, declared: nil)
    }
}
