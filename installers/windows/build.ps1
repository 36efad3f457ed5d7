# Build cp3d for Windows from a clean checkout: a fresh venv, torch (CPU), cp3d[build],
# PyInstaller -> dist\cp3d\ (cp3d.exe windowed, cp3d-cli.exe console), a smoke run of the
# frozen cp3d-cli, then the Inno Setup installer -> dist\cp3d-<version>-windows-x64-setup.exe.
#
#   powershell -ExecutionPolicy Bypass -File installers\windows\build.ps1
#
# Needs Python 3.11 (py launcher or python on PATH) and Inno Setup 6 (iscc.exe; GitHub's
# windows runners have it, else: choco install innosetup). On Windows, PyPI's torch wheel is
# the CPU build.
[CmdletBinding()]
param(
    [string]$Python = "",
    [string]$Venv = "build\venv-win",
    [string]$Torch = "torch==2.13.0",
    [string]$TorchIndex = "",
    [switch]$SkipInstaller
)
$ErrorActionPreference = "Stop"
$Root = Resolve-Path (Join-Path $PSScriptRoot "..\..")
Set-Location $Root

function Invoke-Checked([string]$exe, [string[]]$arguments) {
    & $exe @arguments
    if ($LASTEXITCODE -ne 0) { throw "$exe $($arguments -join ' ') failed ($LASTEXITCODE)" }
}

if (-not $Python) {
    if (Get-Command py -ErrorAction SilentlyContinue) { $Python = "py"; $pyArgs = @("-3.11") }
    else { $Python = "python"; $pyArgs = @() }
} else { $pyArgs = @() }

$sw = [Diagnostics.Stopwatch]::StartNew()
Write-Host "=== venv $Venv"
if (Test-Path $Venv) { Remove-Item -Recurse -Force $Venv }
Invoke-Checked $Python ($pyArgs + @("-m", "venv", $Venv))
$vpy = Join-Path $Venv "Scripts\python.exe"
Invoke-Checked $vpy @("-m", "pip", "install", "-q", "--upgrade", "pip", "wheel")
if ($TorchIndex) { Invoke-Checked $vpy @("-m", "pip", "install", "-q", "--index-url", $TorchIndex, $Torch) }
else { Invoke-Checked $vpy @("-m", "pip", "install", "-q", $Torch) }
Invoke-Checked $vpy @("-m", "pip", "install", "-q", ".[build]")
Invoke-Checked $vpy @("-c", "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)")
$tVenv = $sw.Elapsed.TotalSeconds

Write-Host "=== pyinstaller"
if (-not (Test-Path "cp3d\resources\icons\cp3d.ico")) { Invoke-Checked $vpy @("installers\make_icons.py") }
if (Test-Path "dist\cp3d") { Remove-Item -Recurse -Force "dist\cp3d" }
Invoke-Checked $vpy @("-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
    "--distpath", "dist", "--workpath", "build\pyinstaller", "build_app.spec")
$tBundle = $sw.Elapsed.TotalSeconds - $tVenv
$size = (Get-ChildItem -Recurse "dist\cp3d" | Measure-Object -Property Length -Sum).Sum / 1MB
Write-Host ("bundle: dist\cp3d, {0:N0} MB" -f $size)

Write-Host "=== smoke: frozen cp3d-cli"
$cli = "dist\cp3d\cp3d-cli.exe"
$help = Measure-Command { & $cli --help | Out-Null }
if ($LASTEXITCODE -ne 0) { throw "cp3d-cli --help failed" }
Write-Host ("cp3d-cli --help: {0:N2} s" -f $help.TotalSeconds)
$models = & $cli models
if ($LASTEXITCODE -ne 0 -or -not ($models -match "cp3d_nuclei")) { throw "cp3d-cli models: $models" }
$tmp = if ($env:RUNNER_TEMP) { $env:RUNNER_TEMP } else { $env:TEMP }
$work = Join-Path $tmp "cp3d-smoke"
New-Item -ItemType Directory -Force $work | Out-Null
Copy-Item "cp3d\resources\sample\sample_nuclei.tif" $work
& $cli --image_path (Join-Path $work "sample_nuclei.tif")
if ($LASTEXITCODE -ne 0) { throw "frozen cp3d-cli run failed" }
Invoke-Checked $vpy @("-c", @"
import sys, numpy as np, tifffile
m = tifffile.imread(r'$work\sample_nuclei_cp_masks.tif')
t = tifffile.imread(r'cp3d\resources\sample\sample_nuclei_masks.tif')
n, nt = len(np.unique(m[m > 0])), len(np.unique(t[t > 0]))
print(f'masks: frozen {n}, ground truth {nt}')
sys.exit(0 if abs(n - nt) <= 0.2 * nt else 1)
"@)

if (-not $SkipInstaller) {
    Write-Host "=== Inno Setup"
    $iscc = (Get-Command iscc.exe -ErrorAction SilentlyContinue).Source
    if (-not $iscc) {
        foreach ($p in @("${env:ProgramFiles(x86)}\Inno Setup 6\ISCC.exe", "$env:ProgramFiles\Inno Setup 6\ISCC.exe")) {
            if (Test-Path $p) { $iscc = $p; break }
        }
    }
    if (-not $iscc) { throw "Inno Setup 6 (ISCC.exe) not found: choco install innosetup" }
    $version = (Select-String -Path "pyproject.toml" -Pattern '^version\s*=\s*"(.+)"').Matches[0].Groups[1].Value
    Invoke-Checked $iscc @("/Q", "/DAppVersion=$version", "/DSourceDir=$Root\dist\cp3d",
        "/DOutputDir=$Root\dist", "installers\windows\cp3d.iss")
    Get-ChildItem "dist\cp3d-*-setup.exe" | ForEach-Object { Write-Host ("installer: {0} ({1:N0} MB)" -f $_.Name, ($_.Length / 1MB)) }
}
Write-Host ("times: venv {0:N0} s, bundle {1:N0} s, total {2:N0} s" -f $tVenv, $tBundle, $sw.Elapsed.TotalSeconds)
