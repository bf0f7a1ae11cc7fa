-- Wireshark dissector for the NAT64 handoff protocol (docs/protocol.md, wire
-- profile v1.1) on UDP port 6464: every message with named fields, the inner
-- IPv4/IPv6 packets handed to Wireshark's own dissectors, and malformed
-- datagrams flagged with the same reason names nat64ho counts (nat64ho/core/wire.py).
--
-- v1.1 kept every octet of v1; what changed is behaviour a capture shows but
-- cannot judge: a HELLO is only a claim, confirmed by the first datagram that
-- carries the WELCOME's cookie (often one holding only a COOKIE); cookies
-- change with an epoch (a lifetime set on the server) and an expired one is
-- answered ERROR BAD_COOKIE, after which the NAT64 says HELLO again with the
-- same boot id; requests over a NAT64's share get ERROR RATE_LIMITED. Whether
-- a cookie is valid needs the server's secret, so the dissector never says.
--
-- Install: copy to ~/.local/lib/wireshark/plugins/ (or run
--   tshark -X lua_script:nat64ho.lua ...). Filter with e.g.
--   nat64ho.type == 0x33 || nat64ho.malformed || nat64ho.nat_port == 47102

local proto = Proto("nat64ho", "NAT64 Handoff Protocol")

local DEFAULT_PORT = 6464

-- Octet 0 of a control message (0x30 + subtype) and what it is.
local KINDS = {
    [0x30] = "COOKIE", [0x31] = "HELLO", [0x32] = "WELCOME", [0x33] = "MAP",
    [0x34] = "MAPPING", [0x35] = "LOOKUP", [0x36] = "UNMAPPED", [0x37] = "TOUCH",
    [0x38] = "DELETED", [0x39] = "ERROR",
}
for k = 0x3A, 0x3F do KINDS[k] = "UNASSIGNED" end

local TO_SERVER, TO_NAT64 = "NAT64 to server", "server to NAT64"

-- kind -> direction and the only allowed L values (docs/protocol.md §3); the same
-- catalogue as wire.py, so both call the same datagrams malformed.
local CATALOGUE = {
    [0x30] = { TO_SERVER, 4, 4 }, [0x31] = { TO_SERVER, 12, 12 },
    [0x32] = { TO_NAT64, 12, 12 }, [0x33] = { TO_SERVER, 9, 9 },
    [0x34] = { TO_NAT64, 10, 10 }, [0x35] = { TO_SERVER, 1, 1 },
    [0x36] = { TO_NAT64, 1, 1 }, [0x37] = { TO_SERVER, 1, 255 },
    [0x38] = { TO_NAT64, 10, 10 }, [0x39] = { TO_NAT64, 1, 1 },
}

local ERRORS = {
    [1] = "BAD_COOKIE", [2] = "BAD_VERSION", [3] = "NOT_ALLOWED",
    [4] = "RATE_LIMITED", [5] = "TABLE_FULL",
}

local GROUPS = { [3] = "control message", [4] = "IPv4 packet", [6] = "IPv6 packet" }

local f = {
    direction = ProtoField.string("nat64ho.direction", "Direction"),
    message = ProtoField.none("nat64ho.message", "Message"),
    group = ProtoField.uint8("nat64ho.group", "Group", base.HEX, GROUPS, 0xF0),
    type = ProtoField.uint8("nat64ho.type", "Type", base.HEX, KINDS),
    length = ProtoField.uint8("nat64ho.length", "Length (L, payload = 2L octets)", base.DEC),
    version = ProtoField.uint8("nat64ho.version", "Version", base.DEC),
    flags = ProtoField.uint8("nat64ho.flags", "Flags", base.HEX),
    boot_id = ProtoField.bytes("nat64ho.boot_id", "Boot id"),
    cookie = ProtoField.bytes("nat64ho.cookie", "Cookie"),
    first_port = ProtoField.uint16("nat64ho.first_port", "First NAT port", base.DEC),
    last_port = ProtoField.uint16("nat64ho.last_port", "Last NAT port", base.DEC),
    nat_port = ProtoField.uint16("nat64ho.nat_port", "NAT port", base.DEC),
    ipv6_addr = ProtoField.ipv6("nat64ho.ipv6_addr", "Client IPv6 address"),
    ipv6_port = ProtoField.uint16("nat64ho.ipv6_port", "Client IPv6 port", base.DEC),
    error_code = ProtoField.uint8("nat64ho.error_code", "Error code", base.DEC, ERRORS),
    offending = ProtoField.uint8("nat64ho.error_offending", "Offending message", base.HEX, KINDS),
    zero = ProtoField.bytes("nat64ho.zero", "Zero padding"),
    payload = ProtoField.bytes("nat64ho.payload", "Payload"),
    packet_length = ProtoField.uint16("nat64ho.packet_length", "Packet length", base.DEC),
    -- The reason the server drops the whole datagram, spelled as wire.py does.
    malformed = ProtoField.string("nat64ho.malformed", "Malformed"),
}
proto.fields = f

local function expert_error(name, text)
    return ProtoExpert.new("nat64ho.expert." .. name, text, expert.group.MALFORMED, expert.severity.ERROR)
end

local e = {
    empty = expert_error("empty", "Empty datagram"),
    reserved_group = expert_error("reserved_group", "Reserved group: the rest cannot be framed"),
    truncated = expert_error("truncated", "Message runs past the end of the datagram"),
    bad_length = expert_error("bad_length", "Wrong payload length for this message"),
    wrong_direction = expert_error("wrong_direction", "Message travels in the wrong direction"),
    bad_packet = expert_error("bad_packet", "IPv4 packet shorter than its 20-octet header"),
    dropped = ProtoExpert.new("nat64ho.expert.dropped", "Malformed: the whole datagram is dropped",
                              expert.group.MALFORMED, expert.severity.ERROR),
    skipped = ProtoExpert.new("nat64ho.expert.skipped", "Well-formed, skipped by a v1 server",
                              expert.group.UNDECODED, expert.severity.NOTE),
    nonzero = ProtoExpert.new("nat64ho.expert.nonzero", "Should be zero",
                              expert.group.PROTOCOL, expert.severity.WARN),
    version = ProtoExpert.new("nat64ho.expert.version", "Not protocol version 1",
                              expert.group.PROTOCOL, expert.severity.WARN),
}
proto.experts = e

proto.prefs.port = Pref.uint("UDP port", DEFAULT_PORT, "UDP port of the handoff server")

local ip_dissector = Dissector.get("ip")
local ipv6_dissector = Dissector.get("ipv6")

local function all_zero(range)
    for i = 0, range:len() - 1 do
        if range(i, 1):uint() ~= 0 then return false end
    end
    return true
end

local function add_zero(tree, range)
    local item = tree:add(f.zero, range)
    if not all_zero(range) then item:add_proto_expert_info(e.nonzero) end
end

local function add_endpoint(tree, body, at)
    tree:add(f.ipv6_addr, body(at, 16))
    tree:add(f.ipv6_port, body(at + 16, 2))
    return string.format("[%s]:%d", tostring(body(at, 16):ipv6()), body(at + 16, 2):uint())
end

-- Adds the fields of a control message whose length is right; returns a
-- short summary for the Info column.
local function decode_control(kind, body, tree)
    if kind == 0x30 then
        tree:add(f.cookie, body(0, 8))
        return ""
    elseif kind == 0x31 or kind == 0x32 then
        local v = tree:add(f.version, body(0, 1))
        if body(0, 1):uint() ~= 1 then v:add_proto_expert_info(e.version) end
        tree:add(f.flags, body(1, 1))
        if kind == 0x31 then
            tree:add(f.boot_id, body(2, 8))
            add_zero(tree, body(10, 14))
            return " boot " .. body(2, 8):bytes():tohex():lower()
        end
        tree:add(f.first_port, body(2, 2))
        tree:add(f.last_port, body(4, 2))
        tree:add(f.cookie, body(6, 8))
        tree:add(f.boot_id, body(14, 8))
        add_zero(tree, body(22, 2))
        return string.format(" ports %d-%d", body(2, 2):uint(), body(4, 2):uint())
    elseif kind == 0x33 then
        return " " .. add_endpoint(tree, body, 0)
    elseif kind == 0x34 or kind == 0x38 then
        tree:add(f.nat_port, body(0, 2))
        return string.format(" %d %s", body(0, 2):uint(), add_endpoint(tree, body, 2))
    elseif kind == 0x35 or kind == 0x36 then
        tree:add(f.nat_port, body(0, 2))
        return string.format(" %d", body(0, 2):uint())
    elseif kind == 0x37 then
        local ports = {}
        for at = 0, body:len() - 2, 2 do
            tree:add(f.nat_port, body(at, 2))
            ports[#ports + 1] = tostring(body(at, 2):uint())
        end
        return " " .. table.concat(ports, " ")
    elseif kind == 0x39 then
        tree:add(f.error_code, body(0, 1))
        tree:add(f.offending, body(1, 1))
        return " " .. (ERRORS[body(0, 1):uint()] or tostring(body(0, 1):uint()))
    end
    return ""
end

function proto.dissector(tvb, pinfo, root)
    local port = proto.prefs.port
    -- Decided now: inner packets below overwrite pinfo's ports.
    local direction = (pinfo.dst_port == port) and TO_SERVER or TO_NAT64
    local tree = root:add(proto, tvb())
    tree:add(f.direction, direction):set_generated()

    local names = {}
    local reason = nil
    -- Only the first reason counts, like wire.parse; later problems are
    -- still shown on their messages.
    local function malformed(name, item)
        item:add_proto_expert_info(e[name])
        if reason == nil then reason = name end
    end

    local stop_ip = {}
    local len = tvb:len()
    if len == 0 then malformed("empty", tree) end
    local pos = 0
    while pos < len do
        local first = tvb(pos, 1):uint()
        local group = bit.rshift(first, 4)
        if group == 3 then
            if pos + 2 > len then
                local item = tree:add(f.message, tvb(pos))
                item:set_text("Control message (truncated)")
                item:add(f.type, tvb(pos, 1))
                names[#names + 1] = (KINDS[first] or "?") .. " (truncated)"
                malformed("truncated", item)
                break
            end
            local l = tvb(pos + 1, 1):uint()
            local size = 2 + 2 * l
            if pos + size > len then
                local item = tree:add(f.message, tvb(pos))
                item:set_text(string.format("%s (truncated: %d of %d octets)", KINDS[first], len - pos, size))
                item:add(f.type, tvb(pos, 1))
                item:add(f.length, tvb(pos + 1, 1))
                names[#names + 1] = KINDS[first] .. " (truncated)"
                malformed("truncated", item)
                break
            end
            local name = KINDS[first]
            local item = tree:add(f.message, tvb(pos, size))
            item:add(f.group, tvb(pos, 1))
            item:add(f.type, tvb(pos, 1))
            item:add(f.length, tvb(pos + 1, 1))
            local body = tvb(pos + 2, 2 * l):tvb()
            local spec = CATALOGUE[first]
            local summary = ""
            if spec == nil then
                if l > 0 then item:add(f.payload, tvb(pos + 2, 2 * l)) end
                item:add_proto_expert_info(e.skipped)
                name = string.format("UNASSIGNED(0x%02x)", first)
            elseif l < spec[2] or l > spec[3] then
                if l > 0 then item:add(f.payload, tvb(pos + 2, 2 * l)) end
                malformed("bad_length", item)
            else
                if spec[1] ~= direction then malformed("wrong_direction", item) end
                summary = decode_control(first, body, item)
            end
            item:set_text(string.format("%s (0x%02x), %d octets", name, first, size))
            names[#names + 1] = name .. summary
            pos = pos + size
        elseif group == 4 or group == 6 then
            local label = (group == 4) and "IPv4" or "IPv6"
            local header = (group == 4) and 4 or 6
            if pos + header > len then
                local item = tree:add(f.message, tvb(pos))
                item:set_text(label .. " packet (truncated)")
                item:add(f.group, tvb(pos, 1))
                malformed("truncated", item)
                break
            end
            local size
            if group == 4 then size = tvb(pos + 2, 2):uint() else size = 40 + tvb(pos + 4, 2):uint() end
            local item = tree:add(f.message, tvb(pos, math.min(math.max(size, 1), len - pos)))
            item:add(f.group, tvb(pos, 1))
            item:add(f.packet_length, (group == 4) and tvb(pos + 2, 2) or tvb(pos + 4, 2), size)
            item:set_text(string.format("%s packet, %d octets", label, size))
            if group == 4 and size < 20 then
                malformed("bad_packet", item)
                break
            end
            if pos + size > len then
                malformed("truncated", item)
                break
            end
            item:add_proto_expert_info(e.skipped)
            stop_ip[#stop_ip + 1] = { group, pos, size, item }
            names[#names + 1] = label .. " packet"
            pos = pos + size
        else
            local item = tree:add(f.message, tvb(pos))
            item:set_text(string.format("Reserved group 0x%x", group))
            item:add(f.group, tvb(pos, 1))
            malformed("reserved_group", item)
            break
        end
    end

    if reason ~= nil then
        tree:add(f.malformed, reason):set_generated()
        tree:add_proto_expert_info(e.dropped)
    end
    -- Inner packets last: their dissectors rewrite the addresses and the
    -- columns, and the datagram is still between this NAT64 and the server.
    local saved = { pinfo.src, pinfo.dst, pinfo.net_src, pinfo.net_dst, pinfo.src_port, pinfo.dst_port }
    for _, p in ipairs(stop_ip) do
        local dissector = (p[1] == 4) and ip_dissector or ipv6_dissector
        -- An exception in the inner packet (a short DNS query, say) must not
        -- cost the messages after it; Wireshark has already marked it.
        pcall(dissector.call, dissector, tvb(p[2], p[3]):tvb(), pinfo, p[4])
    end
    if #stop_ip > 0 then
        pinfo.src, pinfo.dst, pinfo.net_src, pinfo.net_dst = saved[1], saved[2], saved[3], saved[4]
        pinfo.src_port, pinfo.dst_port = saved[5], saved[6]
    end
    pinfo.cols.protocol:set("NAT64HO")
    local info = (direction == TO_SERVER and "-> server: " or "-> NAT64: ") .. table.concat(names, ", ")
    if reason ~= nil then info = info .. " [Malformed: " .. reason .. "]" end
    pinfo.cols.info:set(info)
    return len
end

local registered = nil
local function register_port()
    local udp = DissectorTable.get("udp.port")
    if registered ~= nil then udp:remove(registered, proto) end
    registered = proto.prefs.port
    udp:add(registered, proto)
end
proto.prefs_changed = register_port
register_port()
