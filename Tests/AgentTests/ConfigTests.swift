import Foundation
import Testing
@testable import Agent

@Suite("agent config")
struct ConfigTests {
    let minimal = """
    [glance]
    auth_url = http://127.0.0.1:5000/v3
    username = nova
    password = secret
    project_name = service
    """

    @Test func parsesEverySection() throws {
        let c = try AgentConfig.parse("""
        # nova.conf style
        [agent]
        socket_path = /run/imgconv/a.sock
        socket_mode = 0640
        socket_group = nova
        allowed_uids = 0, 64060
        allowed_gids = 117
        state_dir = /var/lib/imgconv
        [glance]
        api_servers = http://glance-a:9292, https://glance-b:9292
        auth_type = v3applicationcredential
        auth_url = http://keystone:5000
        application_credential_id = abc
        application_credential_secret = s3cret
        region_name = RegionTwo
        verify_hash = false
        [cache]
        directory = /var/lib/nova/instances/_base
        max_size = 50G
        min_free = 1.5G
        layout = id
        force_raw = true
        scrub_interval = 1d
        [prefetch]
        images = 198F71F9-53E4-45B9-916D-5EA25EE3ABF2
        property = agent_cache
        tag = golden
        interval = 10m
        concurrency = 4
        bandwidth_limit = 100M
        """)
        #expect(c.agent.socketMode == 0o640 && c.agent.allowedUIDs == [0, 64060] && c.agent.allowedGIDs == [117])
        #expect(c.glance.apiServers == ["http://glance-a:9292", "https://glance-b:9292"])
        #expect(c.glance.authType == .v3applicationcredential && c.glance.regionName == "RegionTwo" && !c.glance.verifyHash)
        #expect(c.cache.maxSize == 50 << 30 && c.cache.minFree == 3 << 29 && c.cache.layout == .id && c.cache.forceRaw)
        #expect(c.cache.scrubInterval == 86400)
        #expect(c.prefetch.images == ["198f71f9-53e4-45b9-916d-5ea25ee3abf2"])
        #expect(c.prefetch.interval == 600 && c.prefetch.concurrency == 4 && c.prefetch.bandwidthLimit == 100 << 20)
        #expect(c.cacheDirectory == "/var/lib/nova/instances/_base")
    }

    /// deploy/agent.conf.example is what operators copy: it parses as shipped, and so does each commented-out
    /// setting once uncommented (alone), so the file never documents a key or a value the agent refuses.
    @Test func theExampleConfigParsesWithEveryCommentedSetting() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../deploy/agent.conf.example").path
        let text = try String(contentsOfFile: path, encoding: .utf8)
        _ = try AgentConfig.parse(text, name: "agent.conf.example")
        let lines = text.components(separatedBy: "\n")
        let setting = /^#\s?([a-z_]+) = (.+)$/
        var section = "", set = Set<String>(), tried = 0
        for line in lines {
            if line.hasPrefix("[") { section = line; continue }
            if let m = line.wholeMatch(of: /([a-z_]+) = .*/) { set.insert(section + String(m.1)) }
        }
        section = ""
        for (n, line) in lines.enumerated() {
            if line.hasPrefix("[") { section = line; continue }
            guard let m = line.wholeMatch(of: setting), !set.contains(section + String(m.1)) else { continue }
            var edited = lines
            var value = String(m.2)
            if m.1 == "nova_conf" {  // read at start-up: an empty nova.conf of our own stands in for Nova's
                value = NSTemporaryDirectory() + "imgconv-example-nova.conf"
                try Data().write(to: URL(fileURLWithPath: value))
            }
            edited[n] = "\(m.1) = \(value)"
            #expect(throws: Never.self, "line \(n + 1): \(line)") {
                _ = try AgentConfig.parse(edited.joined(separator: "\n"), name: "agent.conf.example")
            }
            tried += 1
        }
        #expect(tried >= 10, "only \(tried) commented settings found")
    }

    @Test func defaultsAreSafe() throws {
        let c = try AgentConfig.parse(minimal)
        #expect(c.agent.socketMode == 0o660 && c.agent.allowedUIDs.isEmpty)
        #expect(c.cache.layout == .nova && !c.cache.forceRaw && c.glance.verifyHash)
        #expect(c.cacheDirectory == "/var/lib/imgconv/cache")
    }

    @Test func badInputNamesTheKey() {
        func message(_ text: String) -> String {
            do { _ = try AgentConfig.parse(text, name: "agent.conf"); return "" } catch { return "\(error)" }
        }
        #expect(message(minimal + "\n[cache]\nmax_sise = 5G") == "agent.conf:7: [cache] max_sise: unknown key")
        #expect(message(minimal + "\n[cache]\nmax_size = lots").contains("[cache] max_size: 'lots' is not a size"))
        #expect(message(minimal + "\n[cache]\nlayout = flat").contains("[cache] layout: 'flat' is not nova or id"))
        #expect(message(minimal + "\n[agent]\nsocket_mode = 0999").contains("[agent] socket_mode"))
        #expect(message(minimal + "\n[agent]\nstate_dir = relative/dir").contains("absolute path"))
        #expect(message(minimal + "\n[agent]\nstate_dir = /var/../etc").contains("absolute path"))
        #expect(message(minimal + "\n[prefetch]\nimages = ../../etc/passwd").contains("not an image id"))
        #expect(message(minimal + "\n[libvirt]\nimages_type = rbd").contains("unknown section [libvirt]"))
        #expect(message(minimal + "\n[glance]\nusername = x").contains("set twice"))
        #expect(message("[glance]\nauth_url = http://k:5000\n").contains("username is required"))
        #expect(message("[glance]\nauth_type = token\n").contains("auth_type"))
        #expect(message("stray = 1").contains("outside any section"))
        // The multi-store keys: store names are names, durations are bounded.
        #expect(message(minimal + "\nprefer_stores = ceph1,../x").contains("[glance] prefer_stores: '../x' is not a name"))
        #expect(message(minimal + "\ncopy_to_store = ceph 1").contains("[glance] copy_to_store"))
        #expect(message(minimal + "\ncopy_timeout = 0").contains("[glance] copy_timeout: '0' is out of range"))
        #expect(message(minimal + "\nread_timeout = 1e300").contains("[glance] read_timeout"))
        // Cinder: store names and pools are names, the timeout is bounded, the endpoint is a URL.
        #expect(message(minimal + "\n[cinder_stores]\ncinder-fast = ../etc").contains("[cinder_stores] cinder-fast: '../etc' is not a name"))
        #expect(message(minimal + "\n[cinder_stores]\ncinder fast = volumes").contains("is not a name"))
        #expect(message(minimal + "\n[cinder_stores]\ncinder-fast =").contains("[cinder_stores] cinder-fast"))
        #expect(message(minimal + "\n[cinder]\ntimeout = 0").contains("[cinder] timeout: '0' is out of range"))
        #expect(message(minimal + "\n[cinder]\nendpoint_override = cinder:8776").contains("[cinder] endpoint_override"))
        let cinder = try? AgentConfig.parse(minimal + "\n[cinder]\nenabled = false\nendpoint_override = http://c:8776/v3/p\ntimeout = 5\n"
                                            + "[cinder_stores]\ncinder-fast = volumes-fast\ncinder-slow = volumes-slow")
        #expect(cinder?.cinder.enabled == false && cinder?.cinder.endpointOverride == "http://c:8776/v3/p" && cinder?.cinder.timeout == 5)
        #expect(cinder?.cinder.stores == ["cinder-fast": "volumes-fast", "cinder-slow": "volumes-slow"])
        let ok = try? AgentConfig.parse(minimal + "\nprefer_stores = ceph1, file1\ncopy_to_store = ceph1\ncopy_timeout = 5m\nread_timeout = 30")
        #expect(ok?.glance.preferStores == ["ceph1", "file1"] && ok?.glance.copyToStore == "ceph1")
        #expect(ok?.glance.copyTimeout == 300 && ok?.glance.readTimeout == 30)
    }

    @Test func sizesAndDurations() throws {
        #expect(try AgentConfig.size("4096") == 4096)
        #expect(try AgentConfig.size("512M") == 512 << 20)
        #expect(try AgentConfig.size("2GiB") == 2 << 30)
        #expect(try AgentConfig.size("1T") == 1 << 40)
        #expect(throws: ConfigError.self) { try AgentConfig.size("-1G") }
        #expect(try AgentConfig.duration("90") == 90)
        #expect(try AgentConfig.duration("2h") == 7200)
        #expect(throws: ConfigError.self) { try AgentConfig.duration("soon") }
    }

    @Test func peerPolicy() {
        let p = PeerPolicy(allowedUIDs: [1000], allowedGIDs: [117])
        #expect(p.allows(uid: 0, gid: 0))
        #expect(p.allows(uid: 1000, gid: 1000))
        #expect(p.allows(uid: 2000, gid: 117))
        #expect(!p.allows(uid: 65534, gid: 65534))
    }

    @Test func rbdAndDisksSections() throws {
        let c = try AgentConfig.parse(minimal + """

        [rbd]
        pool = vms2
        ceph_conf = /etc/ceph/ceph.conf
        user = client.nova
        keyring = /etc/ceph/ceph.client.nova.keyring
        connect_timeout = 7
        lease = 1m
        base_wait = 2h
        [disks]
        instances_dir = /var/lib/nova/instances
        gc_idle = 3d
        gc_interval = 0
        """)
        let r = try #require(c.rbd)
        #expect(r.pool == "vms2" && r.user == "nova" && r.connectTimeout == 7 && r.lease == 60 && r.baseWait == 7200)
        #expect(r.cephConf == "/etc/ceph/ceph.conf" && r.keyring == "/etc/ceph/ceph.client.nova.keyring")
        #expect(c.instancesDirectory == "/var/lib/nova/instances" && c.disks.gcIdle == 3 * 86400 && c.disks.gcInterval == 0)
        // No [rbd] section: the local backend, instances under the state directory.
        let local = try AgentConfig.parse(minimal)
        #expect(local.rbd == nil && local.instancesDirectory == "/var/lib/imgconv/instances")
        #expect(throws: ConfigError.self) { try AgentConfig.parse(minimal + "\n[rbd]\nconnect_timeout = 0\n") }
        #expect(throws: ConfigError.self) { try AgentConfig.parse(minimal + "\n[rbd]\npool = ../x\n") }
        #expect(throws: ConfigError.self) { try AgentConfig.parse(minimal + "\n[rbd]\nmon_host = 1.2.3.4\n") }
    }

    /// `nova_conf` fills what the agent's file leaves unset from Nova's own settings; the agent's file wins.
    @Test func readsNovaConf() throws {
        let path = NSTemporaryDirectory() + "nova-\(UUID().uuidString.prefix(6)).conf"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try """
        [DEFAULT]
        instances_path = /var/lib/nova/instances
        [libvirt]
        images_type = rbd
        images_rbd_pool = nova-vms
        images_rbd_ceph_conf = /etc/ceph/nova.conf
        rbd_user = cinder
        rbd_secret_uuid = 457eb676-33da-42ec-9a8c-9293d545c337
        [glance]
        api_servers = http://glance.internal:9292
        auth_type = password
        auth_url = http://keystone.internal:5000/v3
        username = nova
        password = from-nova
        project_name = service
        region_name = RegionOne
        """.write(toFile: path, atomically: true, encoding: .utf8)
        let c = try AgentConfig.parse("""
        [rbd]
        nova_conf = \(path)
        user = imgconv
        """)
        let r = try #require(c.rbd)
        #expect(r.pool == "nova-vms" && r.cephConf == "/etc/ceph/nova.conf")
        #expect(r.user == "imgconv", "the agent's own setting wins")
        #expect(c.glance.apiServers == ["http://glance.internal:9292"])
        #expect(c.glance.authURL == "http://keystone.internal:5000/v3" && c.glance.username == "nova" && c.glance.password == "from-nova")
        #expect(c.glance.regionName == "RegionOne")
        #expect(throws: ConfigError.self) { try AgentConfig.parse("[rbd]\nnova_conf = /nonexistent/nova.conf\n") }
    }

    @Test func memoryTrimIdleIsADuration() throws {
        #expect(try AgentConfig.parse(minimal).agent.memoryTrimIdle == 10)
        #expect(try AgentConfig.parse("[agent]\nmemory_trim_idle = 1m\n" + minimal).agent.memoryTrimIdle == 60)
        #expect(try AgentConfig.parse("[agent]\nmemory_trim_idle = 0\n" + minimal).agent.memoryTrimIdle == 0)
        #expect(try AgentConfig.parse(minimal).agent.memoryTrimCode)
        #expect(try !AgentConfig.parse("[agent]\nmemory_trim_code = false\n" + minimal).agent.memoryTrimCode)
        #expect(throws: ConfigError.self) { try AgentConfig.parse("[agent]\nmemory_trim_code = sometimes\n" + minimal) }
        #expect(throws: ConfigError.self) { try AgentConfig.parse("[agent]\nmemory_trim_idle = soon\n" + minimal) }
    }
}

/// When the agent gives freed memory back: once, at the first idle check after work; never while it works.
@Suite("idle memory trim")
struct IdleTrimTests {
    /// The checks' answers for the process's CPU seconds at start-up (`cpu[0]`) and at each later check.
    func trims(_ cpu: [Double], every seconds: Double = 10) -> [Bool] {
        var t = IdleTrim(idleSeconds: seconds, cpuSeconds: cpu[0])
        return cpu.dropFirst().map { t.check(cpuSeconds: $0) }
    }

    @Test func trimsOnceAfterWork() {
        // Start-up idle: nothing to give back yet. Then 2 s and 1 s of work, then idle checks.
        #expect(trims([0.3, 0.31, 2.3, 3.3, 3.31, 3.32, 3.33]) == [false, false, false, true, false, false])
    }

    @Test func workBeforeTheFirstCheckCounts() {
        // The agent built a disk within its first interval.
        #expect(trims([0.3, 3.3, 3.31]) == [false, true])
    }

    @Test func workInBetweenArmsItAgain() {
        #expect(trims([0, 1, 2, 2.01, 2.02, 4, 4.01]) == [false, false, true, false, false, true])
    }

    @Test func theIdleBoundScalesWithTheInterval() {
        // 0.2 CPU-s in 10 s is work; in 60 s it is idle (0.5 % of a core: 0.3 s).
        #expect(trims([0, 1, 1.2], every: 10) == [false, false])
        #expect(trims([0, 1, 1.2], every: 60) == [false, true])
    }
}
