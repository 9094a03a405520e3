-- Visibility of committed Postgres transactions in a snapshot (prepended to the ranking scripts).
-- A snapshot is 'xmin:xmax:xip,xip,...' and a transaction id a decimal xid8, both as Postgres
-- prints them. Ids are compared as strings (shorter is smaller, then by text): Lua's numbers are
-- doubles and would round ids above 2^53.
local function xid_lt(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function parse_snapshot(text)
  local xmin, xmax, xip = string.match(text, '^(%d+):(%d+):(.*)$')
  local in_progress = {}
  for x in string.gmatch(xip, '%d+') do
    in_progress[x] = true
  end
  return { xmin = xmin, xmax = xmax, xip = in_progress }
end

-- Whether the writes of committed transaction `xid` are visible in snapshot `s`.
local function sees(s, xid)
  if xid_lt(xid, s.xmin) then
    return true
  end
  return xid_lt(xid, s.xmax) and not s.xip[xid]
end

-- Whether `later` sees every transaction `earlier` sees. Exact for snapshots taken one after the
-- other (xmax never goes back); for others it may answer no where the answer is yes, never the
-- reverse.
local function includes(later, earlier)
  if xid_lt(later.xmax, earlier.xmax) then
    return false
  end
  for x in pairs(later.xip) do
    if sees(earlier, x) then
      return false
    end
  end
  return true
end
