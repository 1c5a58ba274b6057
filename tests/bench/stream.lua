-- wrk script: streamed chat completions ("stream": true) with "store": true.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "wrk_common.lua").setup(true)
